"""The trainer: exact resume, gradient accumulation, early stop, divergence, pruning, records, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miras.checkpoint import load_checkpoint
from miras.errors import MirasError, SpecError
from miras.spec import load_spec
from miras.train import lr_at, resolve_train_spec, train
from miras.train_spec import TrainSpec

TINY = {"name": "tiny-gdn", "vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64,
        "memory": {"memory": "linear", "learner": {"kind": "gd", "lr": {"init": 0.5}, "chunk_size": 8},
                   "retention": {"kind": "decay", "grad_at": "decayed"}},
        "mlp": {"kind": "swiglu", "expansion": 2.0}}

RECORD_KEYS = {"name", "status", "error", "spec", "spec_hash", "train", "task", "params", "params_non_embedding",
               "state_bytes", "metrics", "final", "tokens_per_s", "peak_mem_bytes", "wall_s", "hardware", "versions",
               "git_commit", "created"}


def _cfg(**kw) -> TrainSpec:
    base = {"task": {"name": "mqar", "options": {"num_kv_pairs": 4}}, "steps": 6, "batch_size": 8, "seq_len": 32,
            "lr": 3e-3, "warmup": 2, "eval_every": 3, "eval_batches": 1}
    base.update(kw)
    return TrainSpec.model_validate(base)


@pytest.fixture(scope="module")
def tiny():
    return load_spec(TINY)


def test_schedule_warmup_then_cosine():
    cfg = resolve_train_spec(_cfg(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1))
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_record_and_checkpoint(tiny, tmp_path: Path):
    rec = train(tiny, _cfg(), run_dir=tmp_path / "run", progress=False)
    assert rec["status"] == "completed" and RECORD_KEYS <= set(rec)
    on_disk = json.loads((tmp_path / "run" / "record.json").read_text())
    assert on_disk["final"] == rec["final"] and on_disk["spec_hash"] == tiny.spec_hash()
    assert [m["step"] for m in rec["metrics"]] == [3, 6]
    assert {"loss", "val_loss", "accuracy", "accuracy/kv=4"} <= set(rec["final"])
    assert rec["train"]["steps"] == 6 and rec["task"]["name"] == "mqar"
    model, spec, meta = load_checkpoint(tmp_path / "run")
    assert spec == tiny and meta["step"] == 6
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    sd = model.state_dict()
    assert all(torch.equal(weights[k], sd[k]) for k in weights)
    assert not list((tmp_path / "run").glob(".*tmp*"))  # nothing half-written left behind


def test_resume_matches_uninterrupted(tiny, tmp_path: Path):
    cfg = _cfg(steps=8, eval_every=2, checkpoint_every=4)
    full = train(tiny, cfg, run_dir=tmp_path / "full", progress=False)

    class Killed(Exception):
        pass

    def kill_at_4(step, metrics):
        if step == 4:
            raise Killed("simulated kill")

    with pytest.raises(Killed):
        train(tiny, cfg, run_dir=tmp_path / "cut", callback=kill_at_4, progress=False)
    assert json.loads((tmp_path / "cut" / "record.json").read_text())["status"] == "failed"
    resumed = train(tiny, cfg, run_dir=tmp_path / "cut", resume=True, progress=False)
    assert resumed["status"] == "completed"
    assert [m["step"] for m in resumed["metrics"]] == [2, 4, 6, 8]
    for a, b in zip(full["metrics"], resumed["metrics"]):
        for k in ("loss", "val_loss", "accuracy"):
            assert a[k] == b[k], (k, a, b)
    wa = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grad_accumulation_matches_full_batch(tiny, tmp_path: Path):
    a = train(tiny, _cfg(steps=4, eval_every=4), run_dir=tmp_path / "a", progress=False)
    b = train(tiny, _cfg(steps=4, eval_every=4, grad_accum=4), run_dir=tmp_path / "b", progress=False)
    assert a["final"]["loss"] == pytest.approx(b["final"]["loss"], rel=1e-5)
    assert a["final"]["val_loss"] == pytest.approx(b["final"]["val_loss"], rel=1e-5)


def test_early_stop_and_pruning(tiny, tmp_path: Path):
    rec = train(tiny, _cfg(steps=30, early_stop={"metric": "val_loss", "target": 100.0, "mode": "min"}),
                run_dir=tmp_path / "es", progress=False)
    assert rec["status"] == "completed" and rec["final"]["step"] == 3

    optuna = pytest.importorskip("optuna")

    def prune(step, metrics):
        raise optuna.TrialPruned()

    with pytest.raises(optuna.TrialPruned):
        train(tiny, _cfg(), run_dir=tmp_path / "pr", callback=prune, progress=False)
    assert json.loads((tmp_path / "pr" / "record.json").read_text())["status"] == "pruned"


def test_divergence_stops_with_record(tiny, tmp_path: Path):
    rec = train(tiny, _cfg(lr=1e30, warmup=0, grad_clip=None), run_dir=tmp_path / "nan", progress=False)
    assert rec["status"] == "diverged"
    assert "NaN/inf" in rec["error"] and "step" in rec["error"]
    assert json.loads((tmp_path / "nan" / "record.json").read_text())["status"] == "diverged"


def test_bad_input_writes_nothing(tiny, tmp_path: Path):
    with pytest.raises(SpecError, match="unknown task"):
        train(tiny, _cfg(task={"name": "formal:klingon"}), run_dir=tmp_path / "a", progress=False)
    with pytest.raises(SpecError, match="vocab_size must be >= 256"):
        train(tiny, _cfg(task={"name": "lm"}), run_dir=tmp_path / "b", progress=False)
    with pytest.raises(SpecError, match="max_seq_len"):
        train(tiny, _cfg(seq_len=128), run_dir=tmp_path / "c", progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MirasError, match="writable"):
        train(tiny, _cfg(), run_dir=blocker / "run", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_kernel_graphs_setting_resolves_per_device(monkeypatch):
    """train.kernel_graphs: auto turns the MLP kernels' CUDA graphs on for CUDA runs only, and leaves a variable the
    user set alone; off and N set the variable whatever the device."""
    from miras.train import GRAPHS_ENV, kernel_graphs_setting

    monkeypatch.delenv(GRAPHS_ENV, raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    auto = _cfg(kernel_graphs="auto")
    assert kernel_graphs_setting(auto, cpu) is None and kernel_graphs_setting(auto, cuda) == "auto"
    assert kernel_graphs_setting(_cfg(), cuda) is None  # unset, the default: the environment decides
    assert kernel_graphs_setting(_cfg(kernel_graphs="off"), cuda) == "0"
    assert kernel_graphs_setting(_cfg(kernel_graphs=3), cpu) == "3"
    monkeypatch.setenv(GRAPHS_ENV, "5")
    assert kernel_graphs_setting(auto, cuda) is None and kernel_graphs_setting(_cfg(kernel_graphs=0), cuda) == "0"
    with pytest.raises(ValueError, match="kernel_graphs must be auto, off or an integer >= 0, but got -1"):
        _cfg(kernel_graphs=-1)
    # YAML's off / on (booleans): off and auto, not 0 and 1 graph
    assert (_cfg(kernel_graphs=False).kernel_graphs, _cfg(kernel_graphs=True).kernel_graphs) == ("off", "auto")


def test_kernel_graphs_is_set_while_training_and_restored(tiny, tmp_path: Path, monkeypatch):
    """The run sets MIRAS_KERNEL_MLP_GRAPHS for its duration (seen from its callback), records it, and puts the
    old value back afterwards, also when the run fails."""
    import os

    from miras.train import GRAPHS_ENV

    monkeypatch.setenv(GRAPHS_ENV, "7")
    seen = []
    rec = train(tiny, _cfg(kernel_graphs=2), run_dir=tmp_path / "g", progress=False,
                callback=lambda step, metrics: seen.append(os.environ.get(GRAPHS_ENV)))
    assert seen == ["2", "2"] and rec["kernel_graphs"] == "2" and os.environ[GRAPHS_ENV] == "7"

    def fail(step, metrics):
        raise RuntimeError("stop here")

    monkeypatch.delenv(GRAPHS_ENV)
    with pytest.raises(RuntimeError, match="stop here"):
        train(tiny, _cfg(kernel_graphs="off"), run_dir=tmp_path / "f", progress=False, callback=fail)
    assert GRAPHS_ENV not in os.environ
    assert train(tiny, _cfg(steps=3, kernel_graphs="auto"), run_dir=tmp_path / "cpu",
                 progress=False)["kernel_graphs"] == "0"  # auto on the CPU: off
