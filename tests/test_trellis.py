"""Trellis slot memory (reconstruction of papers.md §8.1): the scan against an autograd oracle of the two-pass OGD
rule, closed forms (forgetting, exact write/recall), float64 gradcheck, decoding equivalence, spec and hybrids.

Trellis' slot assignment is a softmax of the state itself, so there is no exact parallel form to compare with: the
recurrent scan is checked against an independent per-token oracle instead.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _model_steps import logits_in_pieces

from miras.compiler import build
from miras.components.trellis import TrellisMixer, trellis_scan
from miras.errors import SpecError
from miras.params import count_params, state_size_bytes
from miras.spec import TrellisSpec, load_spec

D64 = torch.float64


def _inputs(B=2, T=7, H=2, m=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, d, generator=g, dtype=D64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, d, generator=g, dtype=D64), dim=-1)
    v = torch.randn(B, T, H, d, generator=g, dtype=D64)
    lr = torch.rand(B, T, H, generator=g, dtype=D64)
    keep = 0.5 + 0.5 * torch.rand(B, T, H, generator=g, dtype=D64)
    K0 = torch.randn(H, m, d, generator=g, dtype=D64)
    V0 = torch.randn(H, m, d, generator=g, dtype=D64)
    scale = 1.0 + 3.0 * torch.rand(H, generator=g, dtype=D64)
    return q, k, v, lr, keep, K0, V0, scale


def _oracle(q, k, v, lr, keep, K0, V0, scale):
    """Per sequence and head, token by token; the inner gradients come from autograd of the two reconstruction losses
    1/2 ||K^T phi - k||^2 and 1/2 ||V^T phi' - v||^2 with the slot assignments phi, phi' held fixed."""
    B, T, H, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            K, V, s = K0[h].clone(), V0[h].clone(), scale[h]
            for t in range(T):
                kt, vt, a, th = k[b, t, h], v[b, t, h], keep[b, t, h], lr[b, t, h]
                phi = torch.softmax(s * (K @ kt), 0).detach()
                Kv = K.detach().requires_grad_()
                (gK,) = torch.autograd.grad(0.5 * ((Kv.T @ phi - kt) ** 2).sum(), Kv)
                K = a * K - th * gK
                phi = torch.softmax(s * (K @ kt), 0).detach()
                Vv = V.detach().requires_grad_()
                (gV,) = torch.autograd.grad(0.5 * ((Vv.T @ phi - vt) ** 2).sum(), Vv)
                V = a * V - th * gV
                out[b, t, h] = V.T @ torch.softmax(s * (K @ q[b, t, h]), 0)
    return out


def test_scan_matches_autograd_oracle():
    args = _inputs()
    y, K, V = trellis_scan(*args)
    assert torch.allclose(y, _oracle(*args), atol=1e-12)
    # the final state continues the sequence: two halves equal one call
    q, k, v, lr, keep, K0, V0, s = args
    y1, K1, V1 = trellis_scan(q[:, :3], k[:, :3], v[:, :3], lr[:, :3], keep[:, :3], K0, V0, s)
    y2, K2, V2 = trellis_scan(q[:, 3:], k[:, 3:], v[:, 3:], lr[:, 3:], keep[:, 3:], K1, V1, s)
    assert torch.allclose(torch.cat([y1, y2], 1), y, atol=1e-12)
    assert torch.allclose(K2, K, atol=1e-12) and torch.allclose(V2, V, atol=1e-12)


def test_forget_only_closed_form():
    """lr = 0: the slots only decay, K_t = (prod alpha) K_0, so y_t = (prod alpha) V_0^T softmax(s prod(alpha) K_0 q_t)."""
    q, k, v, lr, keep, K0, V0, s = _inputs(T=5)
    y, K, V = trellis_scan(q, k, v, torch.zeros_like(lr), keep, K0, V0, s)
    c = keep.cumprod(1)[..., None, None]  # [B, T, H, 1, 1]
    att = torch.softmax(s[:, None] * torch.einsum("bthd,bthmd->bthm", q, c * K0), -1)
    assert torch.allclose(y, torch.einsum("bthm,bthmd->bthd", att, c * V0), atol=1e-12)
    assert torch.allclose(K, c[:, -1] * K0, atol=1e-12)


def test_write_then_read_recalls_exactly():
    """keep = 1, lr = 1 and a sharp slot assignment: pass 1 moves the matched slot key onto k, pass 2 its value onto v,
    so reading with q = k returns v (one slot per key; m = d orthonormal initial slots)."""
    d, H, n = 6, 1, 4
    K0 = torch.eye(d, dtype=D64)[None]  # [1, m=d, d]
    V0 = torch.zeros(1, d, d, dtype=D64)
    g = torch.Generator().manual_seed(1)
    keys = F.normalize(torch.eye(d, dtype=D64)[:n] + 0.05 * torch.randn(n, d, generator=g, dtype=D64), dim=-1)
    vals = torch.randn(n, d, generator=g, dtype=D64)
    k = keys[None, :, None]  # [1, n, 1, d]
    v = vals[None, :, None]
    ones = torch.ones(1, n, H, dtype=D64)
    scale = torch.tensor([400.0], dtype=D64)
    _, K, V = trellis_scan(k, k, v, ones, ones, K0, V0, scale)
    y = torch.einsum("bhm,bhmd->bhd", torch.softmax(scale * torch.einsum("bhmd,nd->bhnm", K, keys)[0], -1), V)
    assert torch.allclose(y[0], vals, atol=1e-8)
    assert torch.allclose(K[0, 0, :n], keys, atol=1e-8)
    assert torch.allclose(V[0, 0, n:], torch.zeros(d - n, d, dtype=D64), atol=1e-8)  # unmatched slots untouched


def test_gradcheck_scan():
    args = tuple(a.requires_grad_() for a in _inputs(B=1, T=3, H=1, m=2, d=3, seed=3))
    assert torch.autograd.gradcheck(lambda *a: trellis_scan(*a)[0], args, eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradcheck_mixer():
    torch.manual_seed(0)
    mixer = TrellisMixer(TrellisSpec(slots=3, conv_size=2), d_model=4, n_heads=2, d_head=2).double()
    x = torch.randn(1, 4, 4, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mixer(x)[0], (x,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_mixer_decoding_equals_full_forward():
    torch.manual_seed(0)
    mixer = TrellisMixer(TrellisSpec(slots=5, conv_size=3), d_model=8, n_heads=2, d_head=4).double()
    x = torch.randn(2, 9, 8, dtype=D64)
    full, _ = mixer(x)
    state, outs = None, []
    for t in range(9):
        y, state = mixer(x[:, t : t + 1], state)
        outs.append(y)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-12)
    y1, s1 = mixer(x[:, :4])
    y2, _ = mixer(x[:, 4:], s1)
    assert torch.allclose(torch.cat([y1, y2], 1), full, atol=1e-12)


@pytest.mark.parametrize("layout", [["trellis"], ["mag"], ["mal"], ["mac", "trellis"]])
def test_model_count_state_and_decoding(layout):
    spec = load_spec({"vocab_size": 29, "d_model": 8, "n_heads": 2, "n_layers": len(layout), "max_seq_len": 32,
                      "layout": layout, "hybrid_memory": "trellis", "trellis": {"slots": 3},
                      "attention": {"window": 4, "persistent_tokens": 1}, "mac": {"segment_length": 3}})
    torch.manual_seed(0)
    model = build(spec).double()
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    n_mem = sum(b in ("trellis", "mag", "mal", "mac") for b in spec.blocks)
    kv = sum(2 * min(10, 4 if b in ("mag", "mal") else 6) * 2 * 4 for b in spec.blocks if b in ("mag", "mal", "mac"))
    assert state_size_bytes(spec, 10, dtype_bytes=1) == n_mem * 2 * 2 * 3 * 4 + kv
    ids = torch.randint(0, 29, (2, 7))
    assert torch.allclose(logits_in_pieces(model, ids, [1] * 7), model(ids), atol=1e-9)


def test_spec_errors_name_the_field():
    with pytest.raises(SpecError, match=r"trellis\.lr\.granularity"):
        load_spec({"layout": ["trellis"], "trellis": {"lr": {"granularity": "channel"}}})
    with pytest.raises(SpecError, match=r"trellis\.keep\.hi"):
        load_spec({"layout": ["trellis"], "trellis": {"keep": {"hi": 2.0, "init": 0.5}}})
    with pytest.raises(SpecError, match=r"trellis\.slots"):
        load_spec({"layout": ["trellis"], "trellis": {"slots": 0}})
    with pytest.raises(SpecError, match=r"hybrid_memory"):
        load_spec({"layout": ["mag"], "hybrid_memory": "titans"})
