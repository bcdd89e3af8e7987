"""`miras train | eval` end to end: records, checkpoints, YAML train sections, kill + --resume, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from miras.spec import REPO_ROOT

TINY = {"name": "tiny", "vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 128,
        "memory": {"memory": "linear", "learner": {"kind": "gd", "chunk_size": 8},
                   "retention": {"kind": "decay", "grad_at": "decayed"}},
        "mlp": {"kind": "swiglu", "expansion": 2.0}}
SMALL = ["--opt", "num_kv_pairs=4", "--batch-size", "8", "--seq-len", "32", "--eval-batches", "1", "--no-progress"]


def run_cli(*args: str, cwd: Path, monkeypatch) -> tuple[int, str]:
    """In-process CLI call (no interpreter start-up): (exit code, stderr-ish text) as `miras.cli.main` would give."""
    from click.testing import CliRunner

    from miras.cli import cli
    from miras.errors import MirasError

    monkeypatch.chdir(cwd)
    res = CliRunner().invoke(cli, list(args))
    if isinstance(res.exception, MirasError):
        return 1, str(res.exception)
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def miras(*args: str, cwd: Path, wait: bool = True):
    cmd = [sys.executable, "-m", "miras", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def spec_file(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def test_train_then_eval_at_longer_lengths(tmp_path: Path, spec_file: Path, monkeypatch):
    code, out = run_cli("train", str(spec_file), "--task", "mqar", "--steps", "4", "--eval-every", "2", *SMALL,
                        cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 0, out
    run = tmp_path / "runs" / "tiny-mqar"
    rec = json.loads((run / "record.json").read_text())
    assert rec["status"] == "completed" and rec["train"]["steps"] == 4 and rec["task"]["seq_len"] == 32
    assert (run / "checkpoint" / "model.safetensors").is_file()
    assert rec["memory_path"] == "chunked" and "memory path: chunked" in out  # (the CPU's path, said at the end)
    code, _ = run_cli("train", str(spec_file), "--task", "mqar", "--steps", "2", *SMALL, cwd=tmp_path,
                      monkeypatch=monkeypatch)
    assert code == 0 and (tmp_path / "runs" / "tiny-mqar-2" / "record.json").is_file()  # never overwrites
    code, out = run_cli("eval", str(run), "--seq-len", "32", "--seq-len", "64", "--out", "ev.json", cwd=tmp_path,
                        monkeypatch=monkeypatch)
    assert code == 0, out
    results = json.loads((tmp_path / "ev.json").read_text())["results"]
    assert [r["seq_len"] for r in results] == [32, 64] and all("accuracy/kv=4" in r for r in results)
    # evaluating at the training length reproduces the run's final test metrics
    assert results[0]["val_loss"] == pytest.approx(rec["final"]["val_loss"], rel=1e-5)


def test_yaml_train_section_and_flag_override(tmp_path: Path, monkeypatch):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "train": {"task": {"name": "formal:parity"}, "steps": 3, "seq_len": 16,
                                                       "batch_size": 4, "eval_batches": 1}}))
    code, out = run_cli("train", str(spec), "--steps", "2", "--no-progress", cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 0, out
    rec = json.loads((tmp_path / "runs" / "tiny-formal-parity" / "record.json").read_text())
    assert rec["train"]["steps"] == 2 and rec["task"]["name"] == "formal:parity" and rec["train"]["seq_len"] == 16


def test_kill_and_resume_equals_uninterrupted(tmp_path: Path, spec_file: Path):
    args = ["train", str(spec_file), "--task", "mqar", "--steps", "60", "--eval-every", "5", *SMALL]
    full = miras(*args, "--name", "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    proc = miras(*args, "--name", "cut", cwd=tmp_path, wait=False)
    meta = tmp_path / "runs" / "cut" / "checkpoint" / "meta.json"
    deadline = time.time() + 240
    while time.time() < deadline and not meta.is_file():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "runs" / "cut" / "record.json").exists(), "the run finished before it could be killed"
    res = miras(*args, "--name", "cut", "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    a = json.loads((tmp_path / "runs" / "full" / "record.json").read_text())
    b = json.loads((tmp_path / "runs" / "cut" / "record.json").read_text())
    for k in ("loss", "val_loss", "accuracy"):
        assert a["final"][k] == b["final"][k]
    assert [m["val_loss"] for m in a["metrics"]] == [m["val_loss"] for m in b["metrics"]]


@pytest.mark.parametrize("args, message", [
    (["--task", "copy"], "task name must be one of"),
    (["--task", "mad:recall"], "unknown task"),
    (["--task", "lm", "--opt", "files=[nope.txt]", "--set", "vocab_size=256"], "data file not found"),
    (["--task", "lm"], "vocab_size must be >= 256"),
    (["--task", "mqar", "--runs-dir", "blocker/runs"], "must be writable"),
])
def test_bad_input_clear_error_nothing_written(tmp_path: Path, spec_file: Path, args, message, monkeypatch):
    (tmp_path / "blocker").write_text("a file, not a folder")
    code, out = run_cli("train", str(spec_file), "--steps", "2", "--no-progress", *args, cwd=tmp_path,
                        monkeypatch=monkeypatch)
    assert code != 0 and message in out
    assert not (tmp_path / "runs").exists()


def test_bad_input_exit_code_from_the_shell(tmp_path: Path, spec_file: Path):
    res = miras("train", str(spec_file), "--task", "mad:recall", cwd=tmp_path)
    assert res.returncode == 1 and "unknown task" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()
