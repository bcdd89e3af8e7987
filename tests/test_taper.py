"""Depth taper (Tapered LMs, arXiv 2606.23670): exact budget after rounding, monotone, reverse = reversed cosine."""

from __future__ import annotations

import itertools
import math

import pytest

from miras.components.mlp import taper_widths, tapered_widths
from miras.errors import SpecError
from miras.spec import load_spec

COMBOS = list(itertools.product([64, 171, 256, 1000, 1365, 4096], [2, 3, 4, 7, 12, 24], [1, 8, 64, 128]))


@pytest.mark.parametrize("kind", ["uniform", "linear", "cosine", "reverse"])
def test_budget_preserved_exactly(kind):
    checked = 0
    for d_ff, L, m in COMBOS:
        try:
            w = tapered_widths(d_ff, L, kind, 1.5, 0.5, m)
        except SpecError:
            assert kind != "uniform" and 0.5 * d_ff < 1.5 * m  # only a too-coarse multiple may fail
            continue
        checked += 1
        assert len(w) == L
        assert sum(w) == L * d_ff, (d_ff, L, m, w)
        if kind == "uniform":
            assert w == [d_ff] * L  # the base width is not rounded
            continue
        off = [x for x in w if x % m]
        assert len(off) <= 1  # at most one layer carries the remainder
        if (L * d_ff) % m == 0:
            assert not off
    assert checked > len(COMBOS) // 2


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_monotone_decreasing(kind):
    for d_ff, L, m in COMBOS:
        try:
            w = tapered_widths(d_ff, L, kind, 1.5, 0.5, m)
        except SpecError:
            continue
        assert all(a >= b for a, b in zip(w, w[1:])), (d_ff, L, m, w)


def test_reverse_is_reversed_cosine_and_follows_formula():
    for d_ff, L, m in COMBOS:
        try:
            c = tapered_widths(d_ff, L, "cosine", 1.5, 0.5, m)
        except SpecError:
            continue
        assert tapered_widths(d_ff, L, "reverse", 1.5, 0.5, m) == c[::-1]
        # each width within one multiple (plus the remainder) of the paper's formula (papers.md §7)
        for l, w in enumerate(c):
            raw = d_ff * (0.5 + (1.5 - 0.5) * (1 + math.cos(math.pi * l / (L - 1))) / 2)
            assert abs(w - raw) <= m + (L * d_ff) % m


def test_linear_start_end():
    assert tapered_widths(400, 5, "linear", 1.5, 0.5, 1) == [600, 500, 400, 300, 200]
    assert tapered_widths(256, 4, "cosine", 1.5, 0.5, 8) == [384, 320, 192, 128]


def test_width_must_stay_positive():
    with pytest.raises(SpecError, match="width of layer 3 must be > 0"):
        tapered_widths(64, 4, "cosine", 1.9, 0.1, 64)


def test_taper_widths_from_spec():
    spec = load_spec({"d_model": 64, "n_layers": 4, "mlp": {"expansion": 2.5}, "taper": {"kind": "cosine", "multiple": 16}})
    w = taper_widths(spec)
    assert sum(w) == 4 * 160 and w[0] > w[-1]
    assert taper_widths(spec.with_overrides({"mlp.kind": "none", "taper.kind": "uniform"})) == [0, 0, 0, 0]
