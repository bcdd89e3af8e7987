"""Formal-language recognition, the languages of the Hope paper's Table 5 (Behrouz et al. 2025, "Nested Learning"):
parity, (aa)*, (abab)*, a^n b^n, a^n b^n c^n and Shuffle-2 (Bhattamishra et al. 2020, arXiv:2009.11264).

Each example is ``[BOS] w [QUERY] [PAD]...``; the label at ``[QUERY]`` is ``ACCEPT`` or ``REJECT`` (accept/reject
classification, half of the examples positive). Negatives are near misses (one symbol changed, a count off by one,
a truncated period), so that shallow cues such as the length or the symbol set do not decide the class. Every label
comes from the membership oracle ``accepts``.

Length bins as in the table: ``bin0`` = lengths 1..max_len (the training range), ``bin1`` = max_len+1..2*max_len
(length generalisation), and ``bin k`` = 2^(k-1) max_len + 1 .. 2^k max_len when evaluated at longer seq_len.
"""

from __future__ import annotations

import random
import re

from pydantic import Field

from miras.tasks.base import IGNORE, Example, ExampleTask, Options

PAD, BOS, QUERY, REJECT, ACCEPT = 0, 1, 2, 3, 4
SYMBOL0 = 5
ALPHABET = {"parity": "ab", "aa": "a", "abab": "ab", "anbn": "ab", "anbncn": "abc", "shuffle2": "()[]"}
ALIASES = {"(aa)*": "aa", "(abab)*": "abab", "a^nb^n": "anbn", "a^nb^nc^n": "anbncn", "shuffle-2": "shuffle2"}


def _dyck1(s: str, op: str, cl: str) -> bool:
    depth = 0
    for ch in s:
        depth += (ch == op) - (ch == cl)
        if depth < 0:
            return False
    return depth == 0


def accepts(lang: str, w: str) -> bool:
    """Membership oracle of each language (the empty word is not used)."""
    if lang == "parity":  # strings over {a, b} with an even number of b
        return set(w) <= {"a", "b"} and w.count("b") % 2 == 0
    if lang == "aa":
        return re.fullmatch(r"(aa)*", w) is not None
    if lang == "abab":
        return re.fullmatch(r"(abab)*", w) is not None
    if lang == "anbn":
        n = len(w) // 2
        return len(w) % 2 == 0 and w == "a" * n + "b" * n
    if lang == "anbncn":
        n = len(w) // 3
        return len(w) % 3 == 0 and w == "a" * n + "b" * n + "c" * n
    if lang == "shuffle2":  # shuffle of two Dyck-1 languages: () and [] balanced independently
        return set(w) <= set("()[]") and _dyck1(w, "(", ")") and _dyck1(w, "[", "]")
    raise KeyError(lang)


def _dyck_word(rng: random.Random, pairs: int, op: str, cl: str) -> str:
    out, depth, left = [], 0, pairs
    while left or depth:
        if left and (depth == 0 or rng.random() < 0.5):
            out.append(op)
            depth, left = depth + 1, left - 1
        else:
            out.append(cl)
            depth -= 1
    return "".join(out)


def positive(lang: str, rng: random.Random, lo: int, hi: int) -> str | None:
    """A member of length in [lo, hi], or None when the language has none there."""
    period = {"aa": 2, "abab": 4, "anbn": 2, "anbncn": 3, "shuffle2": 2}.get(lang, 1)
    lengths = [n for n in range(max(lo, 1), hi + 1) if n % period == 0]
    if not lengths:
        return None
    n = rng.choice(lengths)
    if lang == "parity":
        w = [rng.choice("ab") for _ in range(n)]
        if w.count("b") % 2:
            i = rng.randrange(n)
            w[i] = "a" if w[i] == "b" else "b"
        return "".join(w)
    if lang == "aa":
        return "a" * n
    if lang == "abab":
        return "abab" * (n // 4)
    if lang == "anbn":
        return "a" * (n // 2) + "b" * (n // 2)
    if lang == "anbncn":
        return "a" * (n // 3) + "b" * (n // 3) + "c" * (n // 3)
    pairs = n // 2  # shuffle2: interleave a ()-word and a []-word
    p = rng.randint(0, pairs)
    u, v = _dyck_word(rng, p, "(", ")"), _dyck_word(rng, pairs - p, "[", "]")
    slots = sorted(rng.sample(range(n), len(u)))
    out, iu, iv = [], 0, 0
    for i in range(n):
        if iu < len(u) and i == slots[iu]:
            out.append(u[iu])
            iu += 1
        else:
            out.append(v[iv])
            iv += 1
    return "".join(out)


def negative(lang: str, rng: random.Random, lo: int, hi: int) -> str:
    """A near-miss non-member of length in [lo, hi]: a member with one symbol changed, or a count/period off by one."""
    alphabet = ALPHABET[lang]
    if lang == "aa":  # over one letter the only non-members are the odd lengths
        odd = [n for n in range(max(lo, 1), hi + 1) if n % 2]
        if not odd:
            raise RuntimeError(f"formal:aa: no odd length in {lo}..{hi}")
        return "a" * rng.choice(odd)
    for _ in range(1000):
        kind = rng.random()
        if lang in ("abab", "anbn", "anbncn") and kind < 0.5:  # wrong length or counts
            if lang == "abab":
                n = rng.randint(max(lo, 1), hi)
                w = ("abab" * (n // 4 + 1))[:n]
            else:
                k = len(alphabet)
                base = rng.randint(1, max(1, hi // k))
                counts = [base] * k
                counts[rng.randrange(k)] += rng.choice((-1, 1))
                w = "".join(ch * c for ch, c in zip(alphabet, counts))
        else:
            w0 = positive(lang, rng, lo, hi)
            if not w0:
                continue
            w = list(w0)
            i = rng.randrange(len(w))
            choices = [c for c in alphabet if c != w[i]] or list(alphabet)
            w[i] = rng.choice(choices)
            w = "".join(w)
        if lo <= len(w) <= hi and not accepts(lang, w):
            return w
    raise RuntimeError(f"formal:{lang}: no negative example of length {lo}..{hi} found")


class FormalOptions(Options):
    max_len: int | None = Field(None, ge=1, description="longest training word; default (seq_len - 2) // 2")


class FormalLanguage(ExampleTask):
    """Accept/reject classification of words of one formal language (label at the [QUERY] token)."""

    name = "formal"
    Opts = FormalOptions
    default_seq_len = 64
    DIFFICULTY = [{"seq_len": 64}, {"seq_len": 128}, {"seq_len": 256}]

    def __init__(self, lang: str, options: dict, **kw) -> None:
        self.lang = ALIASES.get(lang, lang)
        self.name = f"formal:{self.lang}"
        super().__init__(options, **kw)

    @property
    def vocab_size(self) -> int:
        return SYMBOL0 + len(ALPHABET[self.lang])

    def setup(self) -> None:
        self.max_len = self.opts.max_len or (self.seq_len - 2) // 2
        if self.max_len + 2 > self.seq_len:
            raise self.error(f"max_len + 2 must be <= seq_len, but got max_len={self.max_len}, seq_len={self.seq_len}")
        # bin0 = training lengths; bin k = (2^(k-1) L, 2^k L], as far as seq_len allows
        self.bins = {"bin0": (1, self.max_len)}
        k, longest = 1, self.seq_len - 2
        while (1 << (k - 1)) * self.max_len < longest:
            lo, hi = (1 << (k - 1)) * self.max_len + 1, min((1 << k) * self.max_len, longest)
            if positive(self.lang, random.Random(0), lo, hi) is not None:
                self.bins[f"bin{k}"] = (lo, hi)
            k += 1

    def describe(self) -> dict:
        out = super().describe()
        out["options"]["max_len"] = self.max_len  # so that evaluation at other lengths keeps the training range
        return out

    def encode(self, w: str) -> list[int]:
        return [SYMBOL0 + ALPHABET[self.lang].index(ch) for ch in w]

    def example(self, rng: random.Random, split: str) -> Example:
        group = "bin0" if split == "train" else rng.choice(sorted(self.bins))
        lo, hi = self.bins[group]
        w = positive(self.lang, rng, lo, hi) if rng.random() < 0.5 else None
        if w is None:
            w = negative(self.lang, rng, lo, hi)
        label = ACCEPT if accepts(self.lang, w) else REJECT
        ids = [BOS, *self.encode(w), QUERY]
        labels = [IGNORE] * (len(ids) - 1) + [label]
        pad = self.seq_len - len(ids)
        return ids + [PAD] * pad, labels + [IGNORE] * pad, group
