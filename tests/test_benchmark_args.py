"""Benchmark scripts reject malformed options with a usage error that names the option (no traceback), and the GPU
scripts that have a CPU mode run in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value", ["2,x", "0", ""])
def test_bench_mqar_train_kv_is_checked(value):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_mqar.py"), "--train-kv", value],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "argument --train-kv: must be comma-separated positive pair counts" in out.stderr
    assert "Traceback" not in out.stderr


def test_profile_passes_family_is_checked():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/profile_passes.py"), "mlp"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "the family must be 'titans' or 'delta', but got 'mlp'" in out.stderr
    assert "Traceback" not in out.stderr


def test_profile_passes_runs_on_the_cpu():
    """The GPU script that times each pass of the linear kernels runs end to end in the interpreter (--tiny): it had
    kept unpacking five values from linear_scan_fwd after the sixth (Lq's read scales) was added."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/profile_passes.py"), "titans", "--tiny"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| bwd MODE 2 | bwd gradient pass (chunk-parallel) |" in out.stdout and "sum of passes" in out.stdout


def test_kernel_coverage_checks_the_paths_it_reports():
    """benchmarks/kernel_coverage.py draws specs from a search space and counts their memory path on CUDA; with
    --check it runs each drawn model (auto mode deciding as on CUDA, the kernels in Triton's interpreter) and fails
    when a path's claim does not hold."""
    pytest.importorskip("triton")
    script, space = ROOT / "benchmarks/kernel_coverage.py", ROOT / "search_spaces/quickstart.yaml"
    out = subprocess.run([sys.executable, str(script), str(space), "--draws", "4", "--seed", "3", "--check"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 uniform draws, 4 valid specs" in out.stdout  # (optuna 4's random sampler: one of them on the kernels)
    assert "checked 4 drawn models with auto mode deciding as on CUDA: 0 claims failed" in out.stdout
