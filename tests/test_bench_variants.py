"""benchmarks/variants.py: the one table of kernel variants the GPU scripts A/B, read by shell through its CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "variants.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_a_variant_prints_its_settings():
    assert run("gradone").stdout.split() == ["MIRAS_KERNEL_GRAD_SPLIT=0"]
    assert sorted(run("mlpbh32w8").stdout.split()) == ["MIRAS_KERNEL_BH=32", "MIRAS_KERNEL_MLP_CONFIG=8,1"]


def test_an_unknown_variant_is_an_error_naming_the_known_ones():
    out = run("gradtwo")
    assert out.returncode == 1 and out.stdout == ""
    assert "unknown variant 'gradtwo'" in out.stderr and "gradone" in out.stderr and "mlpunfused" in out.stderr


def test_rounds_alternate_the_settings_and_report_the_median():
    """bench_kernels.measure_rounds measures the default row and each variant in turns (A, B, A, B), so drift over a
    GPU run falls on both alike, and reports each one's median round with the min..max of fwd+bwd."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_kernels

    seen = []
    x = torch.ones(3, requires_grad=True)

    def run(x):
        seen.append(os.environ.get("MIRAS_BENCH_TEST_SETTING", "default"))
        return x * 2

    rows = bench_kernels.measure_rounds({"a": {}, "b": {"MIRAS_BENCH_TEST_SETTING": "b"}}, run, (x,), "cpu", None, 3,
                                        rounds=3)
    per_round = len(seen) // 3
    assert seen == (["default"] * (per_round // 2) + ["b"] * (per_round // 2)) * 3
    assert "MIRAS_BENCH_TEST_SETTING" not in os.environ
    for name in ("a", "b"):
        assert rows[name]["name"] == name and rows[name]["spread"].endswith("over 3 rounds")
        low, high = (float(t) for t in rows[name]["spread"].split()[1].split(".."))
        assert low <= round(rows[name]["fwdbwd"], 3) <= high  # (the spread is printed to 3 decimals)


def test_ratio_to_the_reference_prints_only_when_both_rows_ran(capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_kernels

    rows = [{"name": "triton titans", "fwdbwd": 2.5}, {"name": "fla chunk_delta_rule", "error": "not installed"}]
    bench_kernels.ratio_to("triton titans", "fla chunk_delta_rule", rows)
    assert capsys.readouterr().out == ""
    rows[1] = {"name": "fla chunk_delta_rule", "fwdbwd": 1.25}
    bench_kernels.ratio_to("triton titans", "fla chunk_delta_rule", rows)
    assert capsys.readouterr().out == "RATIO triton titans / fla chunk_delta_rule: 2.00x fwd+bwd\n"


def test_rounds_below_one_is_a_clear_error():
    out = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_kernels.py"), "--rounds", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--rounds must be >= 1, but got 0" in out.stderr


def test_a_graphs_row_reports_how_its_backward_calls_ran():
    """A benchmark row under MIRAS_KERNEL_MLP_GRAPHS says how many backward calls ran eagerly, were captured and
    replayed (a row whose graphs never replay measures the eager path); rows without graphs say nothing."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_kernels

    from miras.kernels.mlp import BACKWARD_GRAPHS

    x = torch.ones(3, requires_grad=True)

    def run(x):  # stands in for the MLP kernel: a graphed call counts as replayed, as GraphCache counts it
        BACKWARD_GRAPHS.calls["replayed" if os.environ.get("MIRAS_KERNEL_MLP_GRAPHS") else "eager"] += 1
        return x * 2

    rows = bench_kernels.measure_rounds({"plain": {}, "graphs": {"MIRAS_KERNEL_MLP_GRAPHS": "2"}}, run, (x,), "cpu",
                                        None, 3, rounds=1)
    assert "spread" not in rows["plain"]
    calls = rows["graphs"]["spread"]
    assert calls.startswith("(MLP backward graphs: eager 0, captured 0, replayed ") and not calls.endswith(" 0)")


def test_references_matching_no_row_is_a_clear_error():
    out = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_kernels.py"), "--references", "fla,titan-pytorch"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--references: 'titan-pytorch' matches no reference row" in out.stderr
    assert "titans-pytorch NeuralMemory" in out.stderr  # the known names
