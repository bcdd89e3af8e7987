"""The six MAD synthetic tasks (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid Architectures",
arXiv:2403.17844; reference code athms/mad-lab), re-implemented from their definitions.

    in-context-recall        k v pairs (fixed k -> v map per sequence), then [copy] k* -> predict v*
    fuzzy-in-context-recall  keys and values are motifs of 1..3 tokens; the probe key has the longest motif
    noisy-in-context-recall  like in-context recall with a fraction of pairs replaced by noise tokens
    selective-copying        16 tokens scattered among blanks; after [copy] reproduce them in order
    compression              reproduce a random sequence from the state after a [compress] token (see below)
    memorization             a fixed k -> v map over the whole vocabulary, learned in the weights: k [insert] -> v

Training uses MAD's targets: next-token prediction on every position for the recall tasks, the answer positions
otherwise; test accuracy is over the answer positions only. MAD score of a task = mean test accuracy over its
difficulty settings, each the best over a small lr x weight-decay grid (``mad_protocol``, ``mad_score``).

Deviations [R]: MAD's compression task trains an encoder + MLP decoder on the [compress] token; with a causal LM we
place position-query tokens ``P_1..P_m`` after [compress] and score the prediction of ``x_i`` at ``P_i``. Padding in
fuzzy recall is not a training target (MAD trains on predicting pads).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pydantic import Field

from miras.tasks.base import IGNORE, Example, ExampleTask, Options

# difficulty "changes" of the MAD benchmark (mad-lab configs/tasks/*.yml); level 0 is the baseline
_RECALL_CHANGES: list[dict[str, Any]] = (
    [{}] + [{"task_vocab": v} for v in (32, 64, 128)] + [{"seq_len": s} for s in (256, 512, 1024)]
    + [{"num_train_examples": n} for n in (6400, 3200, 1600, 800)]
)


class RecallOptions(Options):
    task_vocab: int = Field(16, ge=4)
    noise_vocab: int = Field(0, ge=0)
    frac_noise: float = Field(0.0, ge=0, lt=1)
    num_train_examples: int | None = Field(12_800, ge=1)


class InContextRecall(ExampleTask):
    """MAD in-context recall: keys from the lower half, values from the upper half of the non-special tokens."""

    name = "mad:in-context-recall"
    Opts = RecallOptions
    DIFFICULTY = _RECALL_CHANGES
    default_seq_len = 128

    @property
    def vocab_size(self) -> int:
        return self.opts.task_vocab

    def setup(self) -> None:
        o = self.opts
        self.copy_token = o.task_vocab - 1
        ns = o.task_vocab - 1 - o.noise_vocab
        if ns < 4:
            raise self.error(f"task_vocab - 1 - noise_vocab must be >= 4, but got task_vocab={o.task_vocab}, "
                             f"noise_vocab={o.noise_vocab}")
        if o.frac_noise > 0 and o.noise_vocab == 0:
            raise self.error(f"noise_vocab must be > 0 when frac_noise > 0, but got frac_noise={o.frac_noise}")
        if self.seq_len % 2 or self.seq_len < 6:
            raise self.error(f"seq_len must be even and >= 6, but got seq_len={self.seq_len}")
        self.keys = list(range(ns // 2))
        self.values = list(range(ns // 2, ns))
        self.noise = list(range(ns, ns + o.noise_vocab))

    def example(self, rng: random.Random, split: str) -> Example:
        o = self.opts
        seq, tgt = [], []  # tgt[i] is the probe target of seq[i] (test scoring)
        kv: dict[int, int] = {}
        n_pairs = (self.seq_len + 1 - 3) // 2  # leave room for [copy] k* v*
        keep = rng.randrange(n_pairs)  # at least one real pair
        for i in range(n_pairs):
            if o.frac_noise > 0 and i != keep and rng.random() < o.frac_noise:
                seq += [rng.choice(self.noise), rng.choice(self.noise)]
            else:
                k = rng.choice(self.keys)
                v = kv.setdefault(k, rng.choice(self.values))
                seq += [k, v]
            tgt += [IGNORE, IGNORE]
        probe = rng.choice(sorted(kv))
        seq += [self.copy_token, probe, kv[probe]]
        tgt += [IGNORE, IGNORE, kv[probe]]
        seq = seq[-(self.seq_len + 1):]
        tgt = tgt[-(self.seq_len + 1):]
        labels = seq[1:] if split == "train" else tgt[1:]
        return seq[:-1], labels, ""


class NoisyInContextRecall(InContextRecall):
    name = "mad:noisy-in-context-recall"
    DIFFICULTY = (
        [{"task_vocab": 32, "noise_vocab": 16, "frac_noise": f} for f in (0.2, 0.4, 0.6, 0.8)]
        + [{"task_vocab": 32, "noise_vocab": 16, "frac_noise": 0.2, **c} for c in _RECALL_CHANGES[1:]
           if "task_vocab" not in c]
        + [{"task_vocab": v, "noise_vocab": 16, "frac_noise": 0.2} for v in (64, 128)]
    )


class FuzzyOptions(RecallOptions):
    key_motif: int = Field(3, ge=1)
    value_motif: int = Field(3, ge=1)


class FuzzyInContextRecall(ExampleTask):
    """MAD fuzzy recall: keys and values are tuples of 1..motif distinct tokens; the probe key has maximal length."""

    name = "mad:fuzzy-in-context-recall"
    Opts = FuzzyOptions
    DIFFICULTY = _RECALL_CHANGES
    default_seq_len = 128

    @property
    def vocab_size(self) -> int:
        return self.opts.task_vocab

    def setup(self) -> None:
        o = self.opts
        self.copy_token, self.pad_token = o.task_vocab - 1, o.task_vocab - 2
        ns = o.task_vocab - 2 - o.noise_vocab
        self.keys, self.values = list(range(ns // 2)), list(range(ns // 2, ns))
        self.noise = list(range(ns, ns + o.noise_vocab))
        if len(self.keys) < o.key_motif or len(self.values) < o.value_motif:
            raise self.error(f"task_vocab={o.task_vocab} is too small for motifs of {o.key_motif}/{o.value_motif} tokens")
        if self.seq_len < 4 * (o.key_motif + o.value_motif) + 2:
            raise self.error(f"seq_len must be >= {4 * (o.key_motif + o.value_motif) + 2}, but got seq_len={self.seq_len}")

    def example(self, rng: random.Random, split: str) -> Example:
        o = self.opts
        T = self.seq_len

        def key(size: int) -> tuple[int, ...]:
            return tuple(rng.sample(self.keys, size))

        def value() -> tuple[int, ...]:
            return tuple(rng.sample(self.values, rng.randint(1, o.value_motif)))

        def key_size() -> int:
            return rng.randint(1, o.key_motif) if split == "train" else o.key_motif

        k_probe, v_probe = key(key_size()), value()
        kv: dict[tuple[int, ...], tuple[int, ...]] = {k_probe: v_probe}
        budget = T + 1 - 1 - len(k_probe) - len(v_probe)  # room before [copy] k* v*
        probe_at = rng.randrange(max(1, budget - 2 * (o.key_motif + o.value_motif)))
        body: list[int] = []
        placed = False
        while True:
            if not placed and len(body) >= probe_at:
                pair, placed = [*k_probe, *v_probe], True
            elif o.frac_noise > 0 and rng.random() < o.frac_noise:
                pair = [rng.choice(self.noise) for _ in range(key_size() + rng.randint(1, o.value_motif))]
            else:
                k = key(key_size())
                pair = [*k, *kv.setdefault(k, value())]
            if len(body) + len(pair) > budget:
                if placed:
                    break
                continue  # too long: draw a shorter item (the probe pair always fits by construction)
            body += pair
        seq = [*body, self.copy_token, *k_probe, *v_probe]
        tgt = [IGNORE] * (len(body) + 1 + len(k_probe)) + list(v_probe)
        pad = T + 1 - len(seq)
        seq = [self.pad_token] * pad + seq
        tgt = [IGNORE] * pad + tgt
        train_tgt = [t if i >= pad else IGNORE for i, t in enumerate(seq)]
        labels = train_tgt[1:] if split == "train" else tgt[1:]
        return seq[:-1], labels, ""


class CopyOptions(Options):
    task_vocab: int = Field(16, ge=4)
    num_tokens_to_copy: int = Field(16, ge=1)
    num_train_examples: int | None = Field(12_800, ge=1)


class SelectiveCopying(ExampleTask):
    """MAD selective copying: tokens to copy scattered among blanks, then [copy] and one blank per answer."""

    name = "mad:selective-copying"
    Opts = CopyOptions
    DIFFICULTY = ([{}] + [{"seq_len": s} for s in (512, 1024)] + [{"num_tokens_to_copy": n} for n in (32, 64, 96)]
                  + [{"task_vocab": v} for v in (32, 64, 128)])
    default_seq_len = 256

    @property
    def vocab_size(self) -> int:
        return self.opts.task_vocab

    def setup(self) -> None:
        n = self.opts.num_tokens_to_copy
        if self.seq_len <= 2 * n + 1:
            raise self.error(f"seq_len must be > 2 * num_tokens_to_copy + 1, but got seq_len={self.seq_len}, "
                             f"num_tokens_to_copy={n}")
        self.copy_token, self.blank = self.opts.task_vocab - 1, self.opts.task_vocab - 2

    def example(self, rng: random.Random, split: str) -> Example:
        n = self.opts.num_tokens_to_copy
        n_blank = self.seq_len - 2 * n - 1
        to_copy = [rng.randrange(self.blank) for _ in range(n)]
        slots = sorted(rng.sample(range(n + n_blank), n))  # where the copied tokens sit among the blanks
        head = [self.blank] * (n + n_blank)
        for s, tok in zip(slots, to_copy):
            head[s] = tok
        ids = head + [self.copy_token] + [self.blank] * n
        labels = [IGNORE] * (n + n_blank + 1) + to_copy  # answer i at the i-th blank after [copy]
        return ids, labels, ""


class CompressionOptions(Options):
    task_vocab: int = Field(16, ge=3)
    num_train_examples: int | None = Field(12_800, ge=1)


class Compression(ExampleTask):
    """MAD compression, causal form: ``x_1..x_m [compress] P_1..P_m``; predict ``x_i`` at the position token ``P_i``."""

    name = "mad:compression"
    Opts = CompressionOptions
    DIFFICULTY = [{}] + [{"seq_len": s} for s in (64, 128, 256)] + [{"task_vocab": v} for v in (32, 64, 128)]
    default_seq_len = 32

    def setup(self) -> None:
        self.m = (self.seq_len - 1) // 2
        self.comp = self.opts.task_vocab - 1
        self.pos0 = self.opts.task_vocab  # position tokens follow the task vocabulary

    @property
    def vocab_size(self) -> int:
        return self.opts.task_vocab + self.m

    def example(self, rng: random.Random, split: str) -> Example:
        x = [rng.randrange(self.comp) for _ in range(self.m)]
        ids = x + [self.comp] + [self.pos0 + i for i in range(self.m)]
        labels = [IGNORE] * (self.m + 1) + x
        pad = self.seq_len - len(ids)  # an even seq_len leaves one unscored [compress] at the end
        return ids + [self.comp] * pad, labels + [IGNORE] * pad, ""


class MemorizationOptions(Options):
    task_vocab: int = Field(256, ge=4)
    kv_map_seed: int = 12345
    num_train_examples: int | None = Field(256, ge=1)


class Memorization(ExampleTask):
    """MAD memorization: a fixed random key -> value map (seeded by ``kv_map_seed``), queried as ``k [insert] -> v``."""

    name = "mad:memorization"
    Opts = MemorizationOptions
    DIFFICULTY = [{}] + [{"task_vocab": v} for v in (512, 1024, 2048, 4096, 8192)]
    default_seq_len = 32

    @property
    def vocab_size(self) -> int:
        return self.opts.task_vocab

    def setup(self) -> None:
        ns = self.opts.task_vocab - 1
        self.insert = ns
        keys, values = list(range(ns // 2)), list(range(ns // 2, ns))
        random.Random(self.opts.kv_map_seed).shuffle(values)
        self.kv_map = dict(zip(keys, values))
        if self.seq_len % 2:
            raise self.error(f"seq_len must be even, but got seq_len={self.seq_len}")

    def example(self, rng: random.Random, split: str) -> Example:
        ids, labels = [], []
        keys = list(self.kv_map)
        for _ in range(self.seq_len // 2):
            k = rng.choice(keys)
            ids += [k, self.insert]
            labels += [IGNORE, self.kv_map[k]]
        return ids, labels, ""


MAD_TASKS = {cls.name: cls for cls in (InContextRecall, FuzzyInContextRecall, NoisyInContextRecall, SelectiveCopying,
                                       Compression, Memorization)}

MAD_LRS = (1e-4, 5e-4, 1e-3)
MAD_WEIGHT_DECAYS = (0.0, 0.1)


def mad_score(results: list[dict[str, Any]]) -> dict[str, Any]:
    """MAD score from runs ``{difficulty, lr, weight_decay, accuracy}``: best accuracy per setting, then the mean.

    Returns ``{"score": mean over settings, "settings": {difficulty: best accuracy}, "best": {difficulty: run}}``.
    """
    best: dict[int, dict[str, Any]] = {}
    for r in results:
        d = int(r["difficulty"])
        if d not in best or r["accuracy"] > best[d]["accuracy"]:
            best[d] = r
    if not best:
        return {"score": float("nan"), "settings": {}, "best": {}}
    settings = {d: best[d]["accuracy"] for d in sorted(best)}
    return {"score": sum(settings.values()) / len(settings), "settings": settings, "best": best}


def mad_protocol(spec: Any, task: str, train_cfg: Any, *, run_dir: Path, difficulties: list[int] | None = None,
                 lrs: tuple[float, ...] = MAD_LRS, weight_decays: tuple[float, ...] = MAD_WEIGHT_DECAYS,
                 progress: bool = False) -> dict[str, Any]:
    """Run the MAD protocol for one task: every difficulty setting x (lr, weight decay), then ``mad_score``.

    ``train_cfg`` is a ``TrainSpec`` whose task, lr and weight decay are replaced per run; runs go to
    ``run_dir/<difficulty>-lr<lr>-wd<wd>/``.
    """
    from miras.train import train  # local import: the trainer imports the tasks package

    cls = MAD_TASKS[task]
    levels = difficulties if difficulties is not None else list(range(len(cls.DIFFICULTY)))
    results = []
    for d in levels:
        for lr in lrs:
            for wd in weight_decays:
                cfg = train_cfg.model_copy(update={"task": train_cfg.task.model_copy(update={"name": task, "difficulty": d}),
                                                   "lr": lr, "weight_decay": wd})
                rec = train(spec, cfg, run_dir=Path(run_dir) / f"d{d}-lr{lr:g}-wd{wd:g}", progress=progress)
                acc = rec["final"].get("accuracy", 0.0) if rec["status"] == "completed" else 0.0
                results.append({"difficulty": d, "lr": lr, "weight_decay": wd, "accuracy": acc})
    out = mad_score(results)
    out["runs"] = results
    return out
