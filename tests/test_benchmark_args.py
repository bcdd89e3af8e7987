"""Benchmark scripts reject malformed options with a usage error that names the option (no traceback)."""

from __future__ import annotations

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
