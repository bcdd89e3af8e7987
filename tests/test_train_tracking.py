"""W&B logging in offline mode: the run file holds the resolved spec as config, metrics per eval and the summary."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from test_train import TINY, _cfg

from miras.spec import load_spec
from miras.train import train
from miras.train_spec import TrackingSpec


def _records(path: Path):
    """Records of a .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB (crc, length, type, payload)."""
    data, pos, buf = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            yield buf
            buf = b""


def test_wandb_offline_writes_config_history_summary(tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'miras[wandb]')")
    from wandb.proto import wandb_internal_pb2 as pb

    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = load_spec(TINY)
    rec = train(spec, _cfg(), run_dir=tmp_path / "run", progress=False, wandb=TrackingSpec(wandb=True, mode="offline"))
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    parsed = []
    for _ in range(60):  # the wandb service may still be flushing the file when finish() returns
        parsed = []
        for raw in _records(files[0]):
            r = pb.Record()
            r.ParseFromString(raw)
            parsed.append(r)
        if any(r.WhichOneof("record_type") == "exit" for r in parsed):
            break
        time.sleep(0.5)
    history, summary, config = [], {}, {}
    for r in parsed:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.append({**row, "_step": row.get("_step", r.history.step.num)})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in r.run.config.update}
    assert [h["_step"] for h in history] == [3, 6]
    assert history[-1]["val_loss"] == pytest.approx(rec["metrics"][-1]["val_loss"])
    assert summary["status"] == "completed" and summary["accuracy"] == pytest.approx(rec["final"]["accuracy"])
    unwrap = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    assert unwrap["spec"] == spec.model_dump(mode="json")
    assert unwrap["train"]["steps"] == 6


def test_tracking_off_by_default(tmp_path: Path):
    train(load_spec(TINY), _cfg(steps=3), run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "wandb").exists()
