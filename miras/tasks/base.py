"""The task interface: seeded, deterministic batches of ``(input_ids, labels)`` for a causal LM.

Convention for every task: ``labels[b, t]`` is the target of ``logits[b, t]`` (already shifted where the task is
next-token prediction); ``-100`` marks positions that are not scored. A batch also carries one group name per
example (``kv=8``, ``bin1``, ...) so that accuracy can be reported per slice, as zoology reports MQAR per number of
key-value pairs.

Determinism: training batch ``step`` and evaluation batch ``j`` are pure functions of ``(seed, split, index)``, so a
resumed run sees exactly the data an uninterrupted one would, on any number of data-parallel ranks.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from miras.errors import SpecError

IGNORE = -100
SPLITS = {"train": 1, "test": 2}


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python versions)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def torch_rng(*parts: int | str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


@dataclass
class Batch:
    """``input_ids`` and ``labels`` [B, T] long; ``groups`` one slice name per example; ``n_bytes`` (lm) the UTF-8
    bytes covered by the labelled tokens, for bits per byte."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    groups: list[str]
    n_bytes: float | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, lo: int, hi: int) -> Batch:
        """Examples ``lo:hi`` (``n_bytes`` is split in proportion to the labelled tokens)."""
        n_bytes = None
        if self.n_bytes is not None:
            total = int((self.labels != IGNORE).sum())
            part = int((self.labels[lo:hi] != IGNORE).sum())
            n_bytes = self.n_bytes * part / max(total, 1)
        return Batch(self.input_ids[lo:hi], self.labels[lo:hi], self.groups[lo:hi], n_bytes)


class Options(BaseModel):
    """Base of every task's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Task:
    """A task: a name, the token range it uses, and deterministic train/test batches.

    Subclasses set ``Opts`` (their options model), ``DIFFICULTY`` (option overrides per difficulty level, level 0 the
    origin's baseline) and implement ``train_batch`` and ``eval_batches``.
    """

    name: ClassVar[str] = ""
    Opts: ClassVar[type[Options]] = Options
    DIFFICULTY: ClassVar[list[dict[str, Any]]] = [{}]
    has_accuracy: ClassVar[bool] = True
    default_seq_len: ClassVar[int] = 128

    def __init__(self, options: dict[str, Any], *, vocab_size: int, seq_len: int | None, seed: int,
                 difficulty: int = 0) -> None:
        if not 0 <= difficulty < len(self.DIFFICULTY):
            raise SpecError(
                f"train.task.difficulty: must be in 0..{len(self.DIFFICULTY) - 1} for task {self.name!r}, but got "
                f"difficulty={difficulty}. Levels: "
                + "; ".join(f"{i}: {d or 'baseline'}" for i, d in enumerate(self.DIFFICULTY))
            )
        level = dict(self.DIFFICULTY[difficulty])
        level_seq = level.pop("seq_len", None)
        merged = {**level, **options}
        try:
            self.opts = self.Opts.model_validate(merged)
        except ValidationError as err:
            msgs = []
            for e in err.errors(include_url=False):
                loc = ".".join(str(p) for p in e["loc"])
                msg = e["msg"]
                if e["type"] == "extra_forbidden":
                    msg = f"unknown option; valid options: {', '.join(self.Opts.model_fields)}"
                msgs.append(f"train.task.options.{loc}: {msg} (got {e.get('input')!r})")
            raise SpecError(f"task {self.name!r}: invalid options:\n  " + "\n  ".join(msgs)) from None
        self.model_vocab = vocab_size
        self.seq_len = int(seq_len or level_seq or self.default_seq_len)
        self.seed = seed
        self.difficulty = difficulty
        self.setup()
        if self.vocab_size > vocab_size:
            raise SpecError(
                f"train.task: task {self.name!r} uses token ids up to {self.vocab_size - 1}, so vocab_size must be >= "
                f"{self.vocab_size}, but got model vocab_size={vocab_size}. Set `--set vocab_size={self.vocab_size}` "
                f"or lower the task's vocabulary option."
            )

    # ---------------------------------------------------------------------------------------------- to override
    def setup(self) -> None:
        """Check options against ``seq_len``/``vocab`` and precompute; raise SpecError for impossible settings."""

    @property
    def vocab_size(self) -> int:
        """Token ids the task emits are < this."""
        return self.model_vocab

    def train_batch(self, step: int, batch_size: int) -> Batch:
        raise NotImplementedError

    def eval_batches(self, n_batches: int, batch_size: int) -> list[Batch]:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- helpers
    def describe(self) -> dict[str, Any]:
        """The resolved task (stored in run records and checkpoints; ``miras eval`` rebuilds the task from it)."""
        return {"name": self.name, "difficulty": self.difficulty, "seq_len": self.seq_len,
                "vocab_size": self.vocab_size, "options": self.opts.model_dump(mode="json")}

    def error(self, msg: str) -> SpecError:
        return SpecError(f"task {self.name!r}: {msg}")


Example = tuple[list[int], list[int], str]


class ExampleTask(Task):
    """A task whose examples are generated one at a time from ``random.Random(seed, split, index)``.

    ``num_train_examples`` (if the options have it) makes the training set a fixed pool that is reshuffled each epoch,
    as in MAD's fixed-size training sets; otherwise every training example is fresh.
    """

    def example(self, rng: random.Random, split: str) -> Example:
        """One example: ``(input_ids, labels, group)``, both lists of length ``self.seq_len``."""
        raise NotImplementedError

    def _make(self, split: str, index: int) -> Example:
        rng = random.Random(derive_seed(self.seed, self.name, SPLITS[split], index))
        ids, labels, group = self.example(rng, split)
        if len(ids) != self.seq_len or len(labels) != self.seq_len:  # internal invariant of each generator
            raise AssertionError(f"{self.name}: example of length {len(ids)}/{len(labels)} != seq_len={self.seq_len}")
        return ids, labels, group

    def _stack(self, examples: list[Example]) -> Batch:
        return Batch(torch.tensor([e[0] for e in examples], dtype=torch.long),
                     torch.tensor([e[1] for e in examples], dtype=torch.long), [e[2] for e in examples])

    def train_index(self, step: int, i: int, batch_size: int) -> int:
        pool = getattr(self.opts, "num_train_examples", None)
        flat = step * batch_size + i
        if not pool:
            return flat
        epoch, pos = divmod(flat, pool)
        cache = self.__dict__.setdefault("_perm", {})
        if epoch not in cache:
            perm = list(range(pool))
            random.Random(derive_seed(self.seed, self.name, "epoch", epoch)).shuffle(perm)
            cache.clear()
            cache[epoch] = perm
        return cache[epoch][pos]

    def train_batch(self, step: int, batch_size: int) -> Batch:
        return self._stack([self._make("train", self.train_index(step, i, batch_size)) for i in range(batch_size)])

    def eval_batches(self, n_batches: int, batch_size: int) -> list[Batch]:
        return [self._stack([self._make("test", j * batch_size + i) for i in range(batch_size)]) for j in range(n_batches)]


TaskFactory = Callable[..., Task]
