"""The blocked exact delta rule (miras/ops_delta.py) against the token-by-token oracle, in float64.

``chunk_size: 1`` with a linear memory, the L2 bias and GD is DeltaNet / Gated DeltaNet; the chunked mode solves it in
blocks of ``BLOCK`` tokens with one unit-triangular solve per block. It must equal ``mode="recurrent"`` for outputs,
final state and every gradient, for T below, at and not a multiple of the block, with and without an initial state.
"""

from __future__ import annotations

import functools

import pytest
import torch

import miras.ops_chunked as ops_chunked
from miras.ops import memory_scan
from miras.ops_common import prepare
from miras.ops_delta import BLOCK, delta_rule_scan, exact_delta_applies
from miras.spec import MemorySpec

DT = torch.float64
RETENTIONS = {
    "none": {"kind": "none"},
    "decay-decayed": {"kind": "decay", "grad_at": "decayed"},
    "decay-previous": {"kind": "decay", "grad_at": "previous"},
}


def spec_of(retention: dict, **learner) -> MemorySpec:
    return MemorySpec.model_validate(
        {"memory": "linear", "bias": "l2", "retention": retention, "learner": {"kind": "gd", "chunk_size": 1, **learner}}
    )


def leaves(spec: MemorySpec, B: int, T: int, H: int, K: int, V: int, init: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {
        "q": torch.randn(B, T, H, K, generator=g, dtype=DT),
        "k": torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=DT), dim=-1),
        "v": torch.randn(B, T, H, V, generator=g, dtype=DT),
        "lr": 0.05 + 0.9 * torch.rand(B, T, H, generator=g, dtype=DT),
    }
    if spec.retention.kind == "decay":
        x["keep"] = 0.5 + 0.5 * torch.rand(B, T, H, generator=g, dtype=DT)
    if init:
        x["W1"] = torch.randn(B, H, K, V, generator=g, dtype=DT)
    return {n: t.requires_grad_(True) for n, t in x.items()}


def run(spec: MemorySpec, x: dict[str, torch.Tensor], mode: str):
    gates = {n: x[n] for n in ("lr", "keep") if n in x}
    state = {"W1": x["W1"]} if "W1" in x else None
    o, final = memory_scan(spec, x["q"], x["k"], x["v"], gates, state, mode=mode)
    g = torch.Generator().manual_seed(7)
    loss = (o * torch.randn(o.shape, generator=g, dtype=DT)).sum() + (final["W1"] ** 2).sum()
    return o, final["W1"], dict(zip(x, torch.autograd.grad(loss, list(x.values()))))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("T, init", [(1, True), (BLOCK, False), (BLOCK + 5, True), (3 * BLOCK - 7, False)])
@pytest.mark.parametrize("retention", list(RETENTIONS))
def test_blocked_delta_rule_matches_oracle(retention, T, init):
    spec = spec_of(RETENTIONS[retention])
    x = leaves(spec, B=2, T=T, H=3, K=7, V=5, init=init, seed=T)
    o, W, grads = run(spec, x, "chunked")
    o_ref, W_ref, grads_ref = run(spec, x, "recurrent")
    assert rel(o, o_ref) < 1e-10 and rel(W, W_ref) < 1e-10
    for name in grads_ref:
        assert rel(grads[name], grads_ref[name]) < 1e-10, name


def test_block_size_does_not_change_the_result():
    spec = spec_of(RETENTIONS["decay-decayed"])
    x = leaves(spec, B=1, T=45, H=2, K=6, V=6, init=True)
    gates = {"lr": x["lr"], "keep": x["keep"]}
    p = prepare(spec, x["q"], x["k"], x["v"], gates, {"W1": x["W1"]}, None)
    outs = [delta_rule_scan(spec, p, block=b) for b in (4, 16, 64)]
    for o, A in outs[1:]:
        assert rel(o, outs[0][0]) < 1e-12 and rel(A, outs[0][1]) < 1e-12


def test_the_path_is_taken_only_where_it_is_exact(monkeypatch):
    """chunk 1 + linear + l2 + gd uses the blocked solve; momentum, other biases, chunk > 1 and channel keep do not."""
    calls = []
    monkeypatch.setattr(ops_chunked, "delta_rule_scan", functools.partial(_counting, calls))
    B, T, H, K = 1, 9, 1, 4
    q = k = v = torch.randn(B, T, H, K, dtype=DT)
    lr, keep = torch.full((B, T, H), 0.5, dtype=DT), torch.full((B, T, H), 0.9, dtype=DT)
    memory_scan(spec_of(RETENTIONS["decay-decayed"]), q, k, v, {"lr": lr, "keep": keep}, mode="chunked")
    assert len(calls) == 1
    memory_scan(spec_of(RETENTIONS["none"], chunk_size=4), q, k, v, {"lr": lr}, mode="chunked")
    channel = spec_of({"kind": "decay", "gate": {"granularity": "channel"}})
    memory_scan(channel, q, k, v, {"lr": lr, "keep": keep[..., None].expand(B, T, H, K)}, mode="chunked")
    assert len(calls) == 1
    p = prepare(channel, q, k, v, {"lr": lr, "keep": keep[..., None].expand(B, T, H, K)}, None, None)
    assert not exact_delta_applies(channel, p)


def _counting(calls, *args, **kwargs):
    calls.append(1)
    return delta_rule_scan(*args, **kwargs)
