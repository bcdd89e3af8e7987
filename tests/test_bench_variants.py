"""benchmarks/variants.py: the one table of kernel variants the GPU scripts A/B, read by shell through its CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("chunk", ["0", "65"])
def test_chunk_outside_the_kernels_range_is_a_clear_error(chunk):
    out = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_kernels.py"), "--chunk", chunk],
                         capture_output=True, text=True)
    assert out.returncode == 2 and f"--chunk must be between 1 and 64, but got {chunk}" in out.stderr


def test_a_graphs_row_reports_how_its_calls_ran():
    """A benchmark row under MIRAS_KERNEL_MLP_GRAPHS says how many forward and backward calls ran eagerly, were
    captured and replayed (a row whose graphs never replay measures the eager path); rows without graphs say
    nothing."""
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
    assert calls.startswith("(MLP graphs: forward eager 0, captured 0, replayed 0; backward eager 0, captured 0, "
                            "replayed ") and not calls.endswith(" 0)")


def test_references_matching_no_row_is_a_clear_error():
    out = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_kernels.py"), "--references", "fla,titan-pytorch"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--references: 'titan-pytorch' matches no reference row" in out.stderr
    assert "titans-pytorch NeuralMemory" in out.stderr  # the known names


def test_a_variants_file_adds_variants(tmp_path):
    """MIRAS_BENCH_VARIANTS names a JSON file of variants (benchmarks/tune_mlp.py writes one), readable by name."""
    path = tmp_path / "tuned.json"
    path.write_text('{"tuned": {"MIRAS_KERNEL_MLP_CONFIG_BWD_SUMS": "4,3"}}')
    out = subprocess.run([sys.executable, str(SCRIPT), "tuned"], capture_output=True, text=True,
                         env={**os.environ, "MIRAS_BENCH_VARIANTS": str(path)})
    assert out.returncode == 0 and out.stdout.split() == ["MIRAS_KERNEL_MLP_CONFIG_BWD_SUMS=4,3"]
    assert run("tuned").returncode == 1  # (not without the file)
    for text in ("not json", '{"tuned": ["MIRAS_KERNEL_MLP_CONFIG=4,1"]}'):  # a bad file names the variable
        path.write_text(text)
        out = subprocess.run([sys.executable, str(SCRIPT), "tuned"], capture_output=True, text=True,
                             env={**os.environ, "MIRAS_BENCH_VARIANTS": str(path)})
        assert out.returncode != 0 and f"MIRAS_BENCH_VARIANTS={str(path)!r}" in out.stderr


def test_tune_picks_each_kernels_fastest_set_by_a_margin():
    """tune_mlp.pick: per kernel the set where it ran fastest, the default kept unless beaten by > 3% and 5 us;
    PyTorch's own kernels (no config) and sets where a kernel ran at two configs are left out."""
    sys.path.insert(0, str(SCRIPT.parent))
    import tune_mlp

    def timing(kernels: dict, configs: dict) -> dict:
        return {"kernels": kernels, "configs": configs, "kernel_ms": sum(kernels.values()), "step_ms": 0.0}

    timings = {
        "defaults": timing({"_bwd_sums": 1.80, "_fwd_tile": 2.00, "_bwd_mid": 0.50, "_prep": 0.70, "elementwise": 0.1},
                      {"_bwd_sums": ["4,1"], "_fwd_tile": ["4,1"], "_bwd_mid": ["4,1"], "_prep": ["4,1"]}),
        "4,3": timing({"_bwd_sums": 1.50, "_fwd_tile": 1.99, "_bwd_mid": 0.498, "_prep": 0.60, "elementwise": 0.05},
                      {"_bwd_sums": ["4,3"], "_fwd_tile": ["4,1"], "_bwd_mid": ["4,3"], "_prep": ["4,3", "4,1"]}),
        "2,1": timing({"_bwd_sums": 1.60, "_fwd_tile": 1.70, "_bwd_mid": 0.49, "_prep": 0.71},
                      {"_bwd_sums": ["2,1"], "_fwd_tile": ["2,1"], "_bwd_mid": ["2,1"], "_prep": ["2,1"]}),
    }
    chosen, env = tune_mlp.pick(timings)
    # _bwd_mid: 0.49 beats 0.50 by 2% only; _prep's 0.60 ran at two configs; the profiler's elementwise has none
    assert chosen == {"_bwd_sums": "4,3", "_fwd_tile": "2,1", "_bwd_mid": "defaults", "_prep": "defaults"}
    assert env == {"MIRAS_KERNEL_MLP_CONFIG_BWD_SUMS": "4,3", "MIRAS_KERNEL_MLP_CONFIG_FWD_TILE": "2,1"}


def test_tune_picks_a_kernels_output_block_with_its_set():
    """A set of output blocks (tune_mlp.SETS' rows32, out16, ...) that wins for a kernel brings that kernel's own
    MIRAS_KERNEL_MLP_BLOCK_<NAME> into the tuned settings, not the blocks the set gives other kernels."""
    sys.path.insert(0, str(SCRIPT.parent))
    import tune_mlp

    def timing(kernels: dict) -> dict:
        return {"kernels": kernels, "configs": {n: ["4,2"] for n in kernels}, "kernel_ms": sum(kernels.values()),
                "step_ms": 0.0}

    sets = {"defaults": {}, "out16": {"MIRAS_KERNEL_MLP_BLOCK_FWD_OUT": "16", "MIRAS_KERNEL_MLP_BLOCK_BWD_SUMS": "16"}}
    timings = {"defaults": timing({"_fwd_out": 0.30, "_bwd_sums": 1.50}),
               "out16": timing({"_fwd_out": 0.31, "_bwd_sums": 1.20})}
    chosen, env = tune_mlp.pick(timings, sets=sets)
    assert chosen == {"_fwd_out": "defaults", "_bwd_sums": "out16"}
    assert env == {"MIRAS_KERNEL_MLP_CONFIG_BWD_SUMS": "4,2", "MIRAS_KERNEL_MLP_BLOCK_BWD_SUMS": "16"}
    assert set(tune_mlp.SETS["rows32"]) == {"MIRAS_KERNEL_MLP_BLOCK_PREP_STATE"}


def test_tune_takes_whole_sets_that_win_over_all_kernels():
    """tune_mlp.whole_set_winners: a switch of several kernels (WHOLE_SETS: y0parts, states16, rbf16) joins the tuned
    settings where all kernels together beat the default by more than 3% and 5 us; a smaller gain, a loss or a set
    not timed does not."""
    sys.path.insert(0, str(SCRIPT.parent))
    import tune_mlp

    timings = {"defaults": {"kernel_ms": 10.0}, "states16": {"kernel_ms": 9.5}, "y0parts": {"kernel_ms": 9.8},
               "4,2": {"kernel_ms": 8.0}}
    assert tune_mlp.whole_set_winners(timings) == ["states16"]  # (y0parts: 2%; 4,2 is a per-kernel set; no rbf16)
    timings["rbf16"] = {"kernel_ms": 9.0}
    assert tune_mlp.whole_set_winners(timings) == ["states16", "rbf16"]
    assert tune_mlp.whole_set_winners({"defaults": {"kernel_ms": 0.1}, "states16": {"kernel_ms": 0.0}}) == [
        "states16"]
    assert tune_mlp.whole_set_winners({"defaults": {"kernel_ms": 0.1}, "states16": {"kernel_ms": 0.096}}) == []


def test_tune_table_has_a_row_for_every_kernel_a_set_launched():
    """tune_mlp.timing_table: the kernels pick chose for first, with their choice, then those that only some sets
    launch (the splits' _bwd_read, _fwd_read, ...: no choice, nan where a set did not launch them), then the sums and
    the eager steps."""
    sys.path.insert(0, str(SCRIPT.parent))
    import tune_mlp

    timings = {"defaults": {"kernels": {"_fwd_tile": 2.0, "_bwd_sums": 1.5}, "kernel_ms": 3.5, "step_ms": 4.0},
               "splitall": {"kernels": {"_fwd_tile": 1.5, "_bwd_sums": 1.0, "_fwd_read": 0.2, "_bwd_read": 0.6},
                            "kernel_ms": 3.3, "step_ms": 3.6}}
    table = tune_mlp.timing_table(timings, {"_fwd_tile": "defaults", "_bwd_sums": "defaults"})
    assert table[0] == "| kernel | defaults | splitall | chosen |"
    assert table[2:6] == ["| `_fwd_tile` | 2.000 | 1.500 | defaults |", "| `_bwd_sums` | 1.500 | 1.000 | defaults |",
                          "| `_bwd_read` | nan | 0.600 | - |", "| `_fwd_read` | nan | 0.200 | - |"]
    assert table[6:] == ["| all kernels | 3.500 | 3.300 | |", "| eager step (do_bench) | 4.000 | 3.600 | |"]


def test_every_variant_gpu_tune_benches_is_known():
    """gpu_tune.sh names its benchmark's variants in shell (VARIANTS=...): a misspelt name would cost a GPU call's
    benchmark row. The tuned ones come from tune_mlp.py's tuned.json at run time."""
    sys.path.insert(0, str(SCRIPT.parent))
    import variants

    script = (SCRIPT.parent / "gpu_tune.sh").read_text()
    named = set()
    for line in script.splitlines():
        if "VARIANTS=" in line or line.startswith("for v in"):
            named |= set(re.findall(r"\bmlp\w+", line))
    assert {"mlpgraphs", "mlpsplitallgraphs", "mlpsplitsgraphs"} <= named
    assert named <= set(variants.VARIANTS), named - set(variants.VARIANTS)
    assert variants.VARIANTS["mlpsplitsgraphs"] == {"MIRAS_KERNEL_MLP_SPLIT_READ": "1",
                                                    "MIRAS_KERNEL_MLP_SPLIT_SUMS": "1", **variants.GRAPHS}


def test_variants_add_rows_to_their_own_family():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_kernels

    gla, titans = "gla (dot+channel decay+gd)", "titans (l2+decay+momentum)"
    assert bench_kernels.variant_applies("chanfused", gla, "linear")
    assert not bench_kernels.variant_applies("chanfused", titans, "linear")
    assert not bench_kernels.variant_applies("gradone", gla, "linear")
    assert bench_kernels.variant_applies("gradone", titans, "linear")
    assert bench_kernels.variant_applies("mlpgraphs", "mlp2 titans", "mlp")
    assert not bench_kernels.variant_applies("mlpgraphs", titans, "linear")
    delta = "gated deltanet (chunk 1: l2+decay+gd)"
    assert delta in bench_kernels.FAMILIES
    assert bench_kernels.variant_applies("deltatorch", delta, "linear")
    assert not bench_kernels.variant_applies("deltatorch", titans, "linear")
    assert not bench_kernels.variant_applies("gradone", delta, "linear")
