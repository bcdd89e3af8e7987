"""Language modelling on text: a built-in offline corpus, local files, or Hugging Face datasets.

Built-in corpus (``corpus: builtin``, the default): the ``*.py`` files of the running Python's standard library (its
sources and docstrings, plus ``pydoc_data/topics.py``, the reference manual's text), excluding the folders
``test, tests, idlelib, lib2to3, tkinter, turtledemo, ensurepip, unittest, site-packages``. Files are sorted by their
path relative to the stdlib folder; a file goes to **validation** iff ``zlib.crc32(relative_path) % 20 == 0``
(about 5% of files), otherwise to training. The split therefore never changes for a given Python version and
needs no network. Documents are joined with a blank line.

Local data: ``files: [a.txt, b.jsonl, c.parquet]`` (text/markdown files, JSON lines with ``text_field``, Parquet
through ``datasets``); or ``dataset: NAME`` for ``datasets.load_dataset`` (a hub name only when the user names one, or
a builder such as ``json``/``parquet`` with ``data_files``). Without a validation split, the last ``val_fraction`` of
the token stream is the validation set.

Tokenizer: ``byte`` (default; token = UTF-8 byte, vocab 256), or a ``tokenizer.json`` path / Hugging Face tokenizer
name (needs ``tokenizers``/``transformers``). Metrics: loss (nats/token), perplexity ``exp(loss)`` and bits per byte
``loss * tokens / (ln 2 * bytes)``; for non-byte tokenizers bytes are counted with the validation set's average
bytes per token.
"""

from __future__ import annotations

import functools
import json
import sysconfig
import zlib
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from miras.errors import MirasError, SpecError
from miras.tasks.base import Batch, Options, Task, torch_rng

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "unittest", "site-packages",
             "dist-packages", "__pycache__"}


def builtin_corpus_files() -> tuple[list[Path], list[Path]]:
    """(train files, validation files) of the built-in corpus, split by ``crc32(relative path) % 20 == 0``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if set(rel.parts[:-1]) & SKIP_DIRS:
            continue
        (val if zlib.crc32(rel.as_posix().encode()) % 20 == 0 else train).append(f)
    return train, val


def _read_docs(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


class TextOptions(Options):
    corpus: str = Field("builtin", description="builtin, or ignored when files/dataset are given")
    files: list[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    data_files: list[str] | None = None
    split: str = "train"
    val_split: str | None = None
    text_field: str = "text"
    tokenizer: str = "byte"
    val_fraction: float = Field(0.05, gt=0, lt=1)
    max_bytes: int | None = Field(None, ge=1, description="truncate the training text (bytes)")


def _load_local(files: list[str], text_field: str) -> list[str]:
    docs: list[str] = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise SpecError(f"train.task.options.files: data file not found, but got file={name!r}. "
                            f"Give an existing .txt/.md/.jsonl/.json/.parquet file.")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            rows = [json.loads(line) for line in text.splitlines() if line.strip()] if suffix == ".jsonl" else json.loads(text)
            for i, row in enumerate(rows if isinstance(rows, list) else [rows]):
                if not isinstance(row, dict) or text_field not in row:
                    raise SpecError(f"{name}: row {i} must be an object with a {text_field!r} field (text_field), "
                                    f"but got {str(row)[:80]!r}")
                docs.append(str(row[text_field]))
        elif suffix == ".parquet":
            docs += _load_datasets("parquet", None, [str(path)], "train", text_field)
        else:
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
    return docs


def _load_datasets(name: str, config: str | None, data_files: list[str] | None, split: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise MirasError("lm task: loading this data needs the `datasets` package: pip install 'miras[data]'") from None
    if data_files:
        missing = [f for f in data_files if not Path(f).expanduser().exists()]
        if missing:
            raise SpecError(f"train.task.options.data_files: data file not found, but got {missing[0]!r}")
    ds = datasets.load_dataset(name, config, data_files=data_files, split=split)
    if text_field not in ds.column_names:
        raise SpecError(f"train.task.options.text_field: dataset {name!r} has no column {text_field!r}; "
                        f"columns: {', '.join(ds.column_names)}")
    return [str(t) for t in ds[text_field]]


class _Tokenizer:
    """``byte`` or a ``tokenizers``/``transformers`` tokenizer behind one ``encode(text) -> list[int]``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tok: Any = None
        if name == "byte":
            self.vocab_size = 256
            return
        if Path(name).is_file():
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise MirasError("lm task: a tokenizer.json needs the `tokenizers` package (pip install tokenizers)") from None
            self.tok = Tokenizer.from_file(name)
            self.vocab_size = self.tok.get_vocab_size()
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise MirasError(f"lm task: tokenizer {name!r} needs `transformers`, or pass a tokenizer.json path") from None
            self.tok = AutoTokenizer.from_pretrained(name)
            self.vocab_size = len(self.tok)

    def encode(self, docs: list[str]) -> torch.Tensor:
        if self.tok is None:
            data = "\n\n".join(docs).encode("utf-8")
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        ids: list[int] = []
        for d in docs:
            enc = self.tok.encode(d)
            ids += enc.ids if hasattr(enc, "ids") else list(enc)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        if self.tok is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self.tok.decode(ids)


def load_streams(opts: TextOptions) -> dict[str, Any]:
    """Tokenized ``train``/``val`` streams, ``bytes_per_token`` of the validation text, and a fingerprint (cached)."""
    return _load_streams(opts.model_dump_json())


@functools.lru_cache(maxsize=4)
def _load_streams(key: str) -> dict[str, Any]:
    o = TextOptions.model_validate_json(key)
    val_docs: list[str] | None = None
    if o.files:
        docs = _load_local(o.files, o.text_field)
        source = "files:" + ",".join(o.files)
    elif o.dataset:
        docs = _load_datasets(o.dataset, o.dataset_config, o.data_files, o.split, o.text_field)
        if o.val_split:
            val_docs = _load_datasets(o.dataset, o.dataset_config, o.data_files, o.val_split, o.text_field)
        source = f"datasets:{o.dataset}"
    elif o.corpus == "builtin":
        train_files, val_files = builtin_corpus_files()
        docs, val_docs = _read_docs(train_files), _read_docs(val_files)
        source = f"builtin:python-{sysconfig.get_python_version()}-stdlib"
    else:
        raise SpecError(f"train.task.options.corpus: must be 'builtin' (or give files/dataset), but got corpus={o.corpus!r}")
    tok = _Tokenizer(o.tokenizer)
    if val_docs is None:  # split the joined text at val_fraction from the end
        text = "\n\n".join(docs)
        cut = int(len(text) * (1 - o.val_fraction))
        docs, val_docs = [text[:cut]], [text[cut:]]
    if o.max_bytes:
        text = "\n\n".join(docs).encode("utf-8")[: o.max_bytes].decode("utf-8", errors="ignore")
        docs = [text]
    train, val = tok.encode(docs), tok.encode(val_docs)
    val_bytes = len("\n\n".join(val_docs).encode("utf-8"))
    fp = zlib.crc32(train.numpy().tobytes()) ^ (zlib.crc32(val.numpy().tobytes()) << 1)
    return {"train": train, "val": val, "bytes_per_token": val_bytes / max(len(val), 1), "tokenizer": tok,
            "source": source, "fingerprint": f"{fp:x}", "train_tokens": len(train), "val_tokens": len(val)}


class LanguageModeling(Task):
    name = "lm"
    Opts = TextOptions
    has_accuracy = False
    default_seq_len = 128

    def setup(self) -> None:
        self.data = load_streams(self.opts)
        for split in ("train", "val"):
            if len(self.data[split]) < self.seq_len + 1:
                raise self.error(f"the {split} text has {len(self.data[split])} tokens, but seq_len + 1 = "
                                 f"{self.seq_len + 1} are needed; use a shorter --seq-len or more text")

    @property
    def vocab_size(self) -> int:
        return self.data["tokenizer"].vocab_size

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({k: self.data[k] for k in ("source", "fingerprint", "train_tokens", "val_tokens", "bytes_per_token")})
        return out

    def _windows(self, stream: torch.Tensor, starts: torch.Tensor, byte_level: bool) -> Batch:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)  # [B, T+1]
        chunk = stream[idx]
        n_tok = chunk.shape[0] * self.seq_len
        n_bytes = float(n_tok) if byte_level else n_tok * self.data["bytes_per_token"]
        return Batch(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous(), [""] * len(starts), n_bytes)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        stream = self.data["train"]
        g = torch_rng(self.seed, self.name, "train", step)
        starts = torch.randint(0, len(stream) - self.seq_len, (batch_size,), generator=g)
        return self._windows(stream, starts, self.opts.tokenizer == "byte")

    def eval_batches(self, n_batches: int, batch_size: int) -> list[Batch]:
        """Consecutive non-overlapping windows from the start of the validation stream (as many as fit)."""
        stream = self.data["val"]
        n_windows = min(n_batches * batch_size, (len(stream) - 1) // self.seq_len)
        starts = torch.arange(n_windows) * self.seq_len
        return [self._windows(stream, starts[i: i + batch_size], self.opts.tokenizer == "byte")
                for i in range(0, n_windows, batch_size)]
