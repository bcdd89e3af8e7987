"""Analytic parameter counts, state sizes and the budget solver."""

from __future__ import annotations

import pytest
import torch

from miras.compiler import build
from miras.errors import SpecError
from miras.params import breakdown, count_params, solve_budget, state_size_bytes
from miras.spec import load_spec

VARIANTS = [
    {},
    {"tie_embeddings": False, "norm": "layernorm", "mlp.kind": "gelu"},
    {"head_dim": 12, "mlp.kind": "none"},
    {"memory.memory": {"kind": "linear"}, "memory.retention": {"kind": "decay", "gate": {"granularity": "channel"}},
     "memory.learner": {"kind": "gd", "lr": {"rank": 4}}},
    {"memory.retention": {"kind": "elastic"}, "memory.learner": {"kind": "gd", "lr": {"data_dependent": False}},
     "memory.feature_map": {"kind": "polynomial", "degree": 3, "learnable": False}},
    {"memory.bias": {"kind": "huber", "delta": {"granularity": "scalar", "rank": 2}}, "memory.conv_size": 0,
     "memory.output_norm": False, "memory.output_gate": False},
    {"memory.memory": {"kind": "mlp", "depth": 3, "expansion": 1.5, "norm": False}, "memory.retention": {"kind": "kl"},
     "memory.learner": {"kind": "gd"}, "layout": ["mag", "mac", "mal", "swa"], "n_layers": 4,
     "attention.persistent_tokens": 3, "taper.kind": "linear", "taper.multiple": 4},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=[str(i) for i in range(len(VARIANTS))])
def test_count_matches_module(overrides):
    spec = load_spec({"d_model": 24, "n_heads": 2, "n_layers": 2, "max_seq_len": 64, "vocab_size": 50}, overrides)
    model = build(spec)
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    rows = breakdown(spec)
    assert sum(r.count for r in rows) == count_params(spec)
    assert all(r.count > 0 for r in rows)


def test_breakdown_components():
    spec = load_spec("titans-mag")
    names = {r.component for r in breakdown(spec)}
    for part in ("embedding", "mag.persistent_tokens", "mag.attention", "mag.memory.projections", "mag.memory.conv",
                 "mag.memory.gates", "mag.memory.initial_state", "mag.memory.norm_threshold", "mag.mag.gate_norms",
                 "norm", "final_norm"):
        assert part in names, part


def test_state_size_bytes():
    attn = load_spec({"layout": ["attn", "swa"], "d_model": 32, "n_heads": 4, "attention": {"window": 16}})
    H, d = 4, 8
    assert state_size_bytes(attn, 100, dtype_bytes=2) == 2 * 100 * H * d * 2 + 2 * 16 * H * d * 2
    assert state_size_bytes(attn, 10, dtype_bytes=4) == 2 * 10 * H * d * 4 * 2
    lin = load_spec({"layout": ["lmm"], "d_model": 32, "n_heads": 4, "n_layers": 3,
                     "memory": {"memory": {"kind": "linear"}, "learner": {"kind": "momentum"}}})
    assert state_size_bytes(lin, 100) == state_size_bytes(lin, 5000) == 3 * H * (d * d) * 2 * 2  # W and S
    mlp = load_spec("titans-lmm")
    model = build(mlp)
    ids = torch.randint(0, 256, (1, 9))
    _, states = model(ids, return_states=True)
    mem_elems = sum(t[0].numel() for s in states for t in s["memory"].values())
    assert state_size_bytes(mlp, 9, dtype_bytes=4) == mem_elems * 4


@pytest.mark.parametrize("knob", ["d_model", "mlp_expansion", "n_layers"])
def test_solve_budget_lands_within_tolerance(knob):
    spec = load_spec("titans-lmm", {"budget": {"params": 400_000, "tolerance": 0.05, "knob": knob}})
    solved = solve_budget(spec)
    n = count_params(solved)
    assert abs(n - 400_000) <= 0.05 * 400_000
    assert n == sum(p.numel() for p in build(solved).parameters())
    if knob == "d_model":
        assert solved.d_model % solved.n_heads == 0
    # the solution is the closest value: one step either way is not closer
    assert solved.n_layers >= 1


def test_solve_budget_is_closest_for_n_layers():
    spec = load_spec("transformer", {"budget": {"params": 1_000_000, "tolerance": 0.2, "knob": "n_layers"}})
    solved = solve_budget(spec)
    counts = {L: count_params(spec.with_overrides({"n_layers": L})) for L in range(1, 40)}
    best = min(counts, key=lambda L: abs(counts[L] - 1_000_000))
    assert solved.n_layers == best


def test_impossible_budget():
    spec = load_spec("transformer", {"budget": {"params": 1000, "tolerance": 0.01, "knob": "n_layers"}})
    with pytest.raises(SpecError, match=r"budget: params=1000 .* not reachable by varying n_layers"):
        solve_budget(spec)
    spec = load_spec("transformer", {"budget": {"params": 150_000, "tolerance": 0.0, "knob": "n_layers"}})
    with pytest.raises(SpecError, match="closest count"):
        solve_budget(spec)
    with pytest.raises(SpecError, match="budget=None"):
        solve_budget(load_spec("transformer"))
