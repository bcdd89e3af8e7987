"""benchmarks/variants.py: the one table of kernel variants the GPU scripts A/B, read by shell through its CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
