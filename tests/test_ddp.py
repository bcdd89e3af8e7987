"""Data-parallel training (torchrun, 2 gloo processes on CPU) gives the single-process result at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from miras.spec import REPO_ROOT

TINY = {"name": "tiny", "vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64,
        "memory": {"memory": "linear", "learner": {"kind": "gd", "chunk_size": 8},
                   "retention": {"kind": "decay", "grad_at": "decayed"}},
        "mlp": {"kind": "swiglu", "expansion": 2.0}}
ARGS = ["--task", "mqar", "--opt", "num_kv_pairs=4", "--steps", "4", "--batch-size", "8", "--seq-len", "32",
        "--eval-every", "2", "--eval-batches", "2", "--lr", "3e-3", "--no-progress"]


def _run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env, timeout=300)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo multi-process test runs on Linux/macOS")
def test_ddp_two_processes_match_single(tmp_path: Path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    one = _run([sys.executable, "-m", "miras", "train", str(spec), *ARGS, "--name", "one"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "miras",
                "train", str(spec), *ARGS, "--name", "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "runs" / "one" / "record.json").read_text())
    b = json.loads((tmp_path / "runs" / "two" / "record.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    for ma, mb in zip(a["metrics"], b["metrics"], strict=True):
        for k in ("loss", "val_loss", "accuracy"):
            assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-6), (k, ma, mb)
