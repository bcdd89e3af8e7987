"""Delta gradient descent (Nested Learning Eq. 57) in ``memory_scan``, float64.

Closed forms written here: NL Eq. 57 for a linear memory (b = 1), the chunk semantics for b > 1 (gradients at the chunk
start, projector token by token) against the chunked UT solve; ``mlp_form: none`` is plain GD; chunked vs recurrent over
memories x biases x retentions with gradients.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_ops_atlas import assert_match, make_inputs, mspec, rel_err, run

from miras.ops import memory_scan

B, H, K = 2, 2, 6


def _inputs(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    lr = 0.05 + 0.6 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    keep = 0.7 + 0.29 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    W0 = 0.4 * torch.randn(B, H, K, K, generator=g, dtype=torch.float64)
    return q, k, v, lr, keep, W0


def _read(q_t: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return (q_t[:, :, None, :] @ W)[:, :, 0]


@pytest.mark.parametrize("bias", ["l2", "dot"])
@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_dgd_linear_is_nl_eq57(mode: str, bias: str) -> None:
    """b = 1: W_t = (alpha_t I - eta_t k_t^T k_t) W_{t-1} - eta_t k_t^T r_t, r = k W - v (l2) or -v (dot)."""
    Tn = 9
    q, k, v, lr, keep, W0 = _inputs(Tn)
    spec = mspec("linear", bias, "decay", "dgd", chunk=1)
    o, st = memory_scan(spec, q, k, v, {"lr": lr, "keep": keep}, {"W1": W0}, mode=mode)
    W = W0.clone()
    eye = torch.eye(K, dtype=torch.float64)
    for t in range(Tn):
        kt, vt = k[:, t, :, None, :], v[:, t, :, None, :]
        a, e = keep[:, t, :, None, None], lr[:, t, :, None, None]
        r = kt @ W - vt if bias == "l2" else -vt
        W = (a * eye - e * kt.transpose(-1, -2) @ kt) @ W - e * kt.transpose(-1, -2) @ r
        assert rel_err(o[:, t], _read(q[:, t], W)) < 1e-12
    assert rel_err(st["W1"], W) < 1e-12


@pytest.mark.parametrize("chunk,Tn", [(4, 11), (5, 5), (3, 2)])
def test_dgd_chunked_is_the_chunk_semantics(chunk: int, Tn: int) -> None:
    """b > 1: the l2 gradient of every token is taken at the chunk-start state, the projector acts token by token:
    W_t = (alpha_t I - eta_t k_t^T k_t) W_{t-1} - eta_t k_t^T (k_t W_s - v_t). The chunked mode solves this with a
    unit-triangular system; here it is a plain loop."""
    q, k, v, lr, keep, W0 = _inputs(Tn, seed=2)
    spec = mspec("linear", "l2", "decay", "dgd", chunk=chunk)
    o, st = memory_scan(spec, q, k, v, {"lr": lr, "keep": keep}, {"W1": W0}, mode="chunked")
    W = W0.clone()
    eye = torch.eye(K, dtype=torch.float64)
    for t in range(Tn):
        if t % chunk == 0:
            Ws = W
        kt, vt = k[:, t, :, None, :], v[:, t, :, None, :]
        a, e = keep[:, t, :, None, None], lr[:, t, :, None, None]
        W = (a * eye - e * kt.transpose(-1, -2) @ kt) @ W - e * kt.transpose(-1, -2) @ (kt @ Ws - vt)
        assert rel_err(o[:, t], _read(q[:, t], W)) < 1e-12
    assert rel_err(st["W1"], W) < 1e-12


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_dgd_mlp_form_none_is_gd_and_first_layer_differs(mode: str) -> None:
    mem = {"kind": "mlp", "depth": 2, "expansion": 1.5}
    spec_none = mspec(mem, "l2", "decay", "dgd", mlp_form="none")
    spec_gd = mspec(mem, "l2", "decay", "gd")
    spec_first = mspec(mem, "l2", "decay", "dgd")
    inp = make_inputs(spec_gd)
    a = run(spec_none, inp, mode, with_grads=False)
    b = run(spec_gd, inp, mode, with_grads=False)
    c = run(spec_first, inp, mode, with_grads=False)
    assert all(rel_err(a[n], b[n]) < 1e-14 for n in a)
    assert rel_err(c["o"], b["o"]) > 1e-4
    assert rel_err(c["final:W2"], b["final:W2"]) > 1e-6  # the projector on W1 changes the later layers through the chunks


def _cases() -> list:
    mems = {
        "linear": {"kind": "linear"},
        "mlp2": {"kind": "mlp", "depth": 2, "expansion": 1.5},
        "mlp3-nores": {"kind": "mlp", "depth": 3, "expansion": 1.5, "residual": False, "norm": False, "activation": "tanh"},
    }
    rets = {
        "none": {"kind": "none"},
        "decay": {"kind": "decay"},
        "decay-decayed": {"kind": "decay", "grad_at": "decayed"},
        "lq": {"kind": "lq"},
        "lq-decayed": {"kind": "lq", "grad_at": "decayed"},
    }
    cases = []
    for (mname, mem), bias, (rname, ret) in itertools.product(mems.items(), ["dot", "l2", "lp", "huber"], rets.items()):
        cases.append(pytest.param(mspec(mem, bias, ret, "dgd"), id=f"{mname}-{bias}-{rname}"))
    for rname in ("decay", "decay-decayed"):
        ret = {**rets[rname], "gate": {"granularity": "channel"}}
        cases.append(pytest.param(mspec("linear", "l2", ret, "dgd"), id=f"linear-l2-{rname}-channel"))
    return cases


@pytest.mark.parametrize("spec", _cases())
def test_dgd_chunked_matches_recurrent(spec) -> None:
    inp = make_inputs(spec)
    ref = run(spec, inp, "recurrent")
    assert ref["grad:q"].abs().sum() > 0 and ref["grad:k"].abs().sum() > 0
    assert_match(ref, run(spec, inp, "chunked"))
