"""Language-modelling data: the built-in offline corpus and its stable split, local files, `datasets` loading."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch

from miras.errors import SpecError
from miras.tasks import make_task
from miras.tasks.text import builtin_corpus_files


def test_builtin_corpus_offline_stable_split():
    train, val = builtin_corpus_files()
    assert len(train) > 100 and len(val) > 5
    assert not set(train) & set(val)
    root = train[0].parents[len(train[0].relative_to(train[0].parents[0]).parts) - 1]
    for f in val[:20]:  # the documented rule: crc32(relative path) % 20 == 0
        rel = next(f.relative_to(p).as_posix() for p in f.parents if (p / "os.py").is_file())
        assert zlib.crc32(rel.encode()) % 20 == 0
    assert root.exists()
    task = make_task({"name": "lm"}, vocab_size=256, seq_len=64, seed=0)
    again = make_task({"name": "lm"}, vocab_size=256, seq_len=64, seed=0)
    assert task.describe()["fingerprint"] == again.describe()["fingerprint"]
    d = task.describe()
    assert d["val_tokens"] > 10_000 and d["train_tokens"] > 20 * d["val_tokens"] / 2
    b = task.train_batch(0, 4)
    assert torch.equal(b.labels[:, :-1], b.input_ids[:, 1:])  # next-byte targets
    assert b.n_bytes == 4 * 64 and int(b.input_ids.max()) < 256
    ev = task.eval_batches(2, 4)
    assert torch.equal(ev[0].input_ids[1, 0], ev[0].labels[0, -1])  # consecutive windows of the validation text


def test_local_text_and_jsonl_files(tmp_path: Path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world. " * 400)
    rows = tmp_path / "b.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"row {i}: " + "abc " * 40}) for i in range(40)))
    task = make_task({"name": "lm", "options": {"files": [str(txt), str(rows)], "val_fraction": 0.1}},
                     vocab_size=256, seq_len=32, seed=0)
    text = bytes(task.data["train"].tolist()).decode()
    assert text.startswith("hello world.") and "row 0: abc" in text
    with pytest.raises(SpecError, match="data file not found"):
        make_task({"name": "lm", "options": {"files": [str(tmp_path / "missing.txt")]}}, vocab_size=256)
    with pytest.raises(SpecError, match="vocab_size must be >= 256"):
        make_task({"name": "lm", "options": {"files": [str(txt)]}}, vocab_size=128)


def test_datasets_local_parquet_and_json(tmp_path: Path):
    datasets = pytest.importorskip("datasets", reason="`datasets` is not installed (pip install 'miras[data]')")
    docs = [f"document {i} " + "xyz " * 30 for i in range(50)]
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    a = make_task({"name": "lm", "options": {"files": [str(tmp_path / "d.parquet")]}}, vocab_size=256, seq_len=32)
    b = make_task({"name": "lm", "options": {"dataset": "json", "data_files": [str(tmp_path / "d.jsonl")],
                                            "text_field": "body"}}, vocab_size=256, seq_len=32)
    joined = "\n\n".join(docs).encode()
    for task in (a, b):
        got = bytes(torch.cat([task.data["train"], task.data["val"]]).tolist())
        assert got.replace(b"\n\n", b"") == joined.replace(b"\n\n", b"")
    with pytest.raises(SpecError, match="no column 'content'"):
        make_task({"name": "lm", "options": {"dataset": "json", "data_files": [str(tmp_path / "d.jsonl")],
                                            "text_field": "content"}}, vocab_size=256, seq_len=32)


def test_bits_per_byte_of_a_uniform_model():
    """A model that predicts uniformly over 256 bytes has loss ln 256 and exactly 8 bits per byte."""
    from miras.train import evaluate

    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, 256)

    task = make_task({"name": "lm"}, vocab_size=256, seq_len=32, seed=0)
    m = evaluate(Uniform(), task, task.eval_batches(2, 4), device=torch.device("cpu"))
    assert m["val_loss"] == pytest.approx(math.log(256))
    assert m["bpb"] == pytest.approx(8.0) and m["ppl"] == pytest.approx(256.0)
