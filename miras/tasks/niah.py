"""Single-needle retrieval, passkey style (Mohtashami & Jaggi 2023, "Landmark Attention", arXiv:2305.16300; the
S-NIAH-1 setting of RULER, Hsieh et al. 2024, arXiv:2404.06654).

    ... filler ... [NEEDLE] d_1 ... d_n ... filler ... [QUERY] d_1 ... d_n

The filler is a fixed "sentence" of tokens repeated (``filler: repeat``, the passkey setting) or random tokens
(``filler: random``); the needle sits at a uniformly random depth. After [QUERY] the model must reproduce the
passkey digits (teacher forced: the label at [QUERY] is d_1, at d_i it is d_{i+1}). Accuracy = digits right;
groups are needle-depth quartiles. Train at one length, evaluate at longer ones (``miras eval --seq-len``) for length
extrapolation.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from miras.tasks.base import IGNORE, Example, ExampleTask, Options, derive_seed

PAD, NEEDLE, QUERY, DIGIT0 = 0, 1, 2, 3
FILLER0 = DIGIT0 + 10


class NIAHOptions(Options):
    needle_len: int = Field(5, ge=1, description="passkey digits")
    filler: Literal["repeat", "random"] = "repeat"
    filler_vocab: int = Field(32, ge=2, description="distinct filler tokens")
    sentence_len: int = Field(12, ge=1, description="length of the repeated filler sentence")


class NIAH(ExampleTask):
    name = "niah"
    Opts = NIAHOptions
    default_seq_len = 128
    DIFFICULTY = [{"seq_len": n} for n in (128, 256, 512, 1024, 2048)]

    @property
    def vocab_size(self) -> int:
        return FILLER0 + self.opts.filler_vocab

    def setup(self) -> None:
        n = self.opts.needle_len
        if self.seq_len < 2 * (n + 1) + 1:
            raise self.error(f"seq_len must be >= 2 * (needle_len + 1) + 1, but got seq_len={self.seq_len}, needle_len={n}")
        # the filler sentence is part of the task definition, not of the seed: same at every length and seed
        srng = random.Random(derive_seed("niah-sentence", self.opts.filler_vocab, self.opts.sentence_len))
        self.sentence = [FILLER0 + srng.randrange(self.opts.filler_vocab) for _ in range(self.opts.sentence_len)]

    def example(self, rng: random.Random, split: str) -> Example:
        n, T = self.opts.needle_len, self.seq_len
        digits = [DIGIT0 + rng.randrange(10) for _ in range(n)]
        n_fill = T - (n + 1) - n  # the query block [QUERY] d_1..d_{n-1} has n tokens
        if self.opts.filler == "repeat":
            start = rng.randrange(len(self.sentence))
            fill = [self.sentence[(start + i) % len(self.sentence)] for i in range(n_fill)]
        else:
            fill = [FILLER0 + rng.randrange(self.opts.filler_vocab) for _ in range(n_fill)]
        depth = rng.randint(0, n_fill)
        ids = fill[:depth] + [NEEDLE, *digits] + fill[depth:] + [QUERY, *digits[:-1]]
        labels = [IGNORE] * (T - n) + digits
        quartile = min(3, 4 * depth // max(n_fill, 1))
        return ids, labels, f"depth={25 * quartile}-{25 * quartile + 25}%"
