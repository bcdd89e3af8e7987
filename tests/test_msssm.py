"""MS-SSM (reconstruction of papers.md §8.2): parallel (chunked prefix) scan vs the sequential oracle vs the closed form,
the dilated decomposition vs an explicit sum, scale-dependent init, float64 gradcheck, decoding equivalence, spec."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _model_steps import logits_in_pieces

from miras.compiler import build
from miras.components.msssm import (
    MSSSMMixer,
    msssm_dims,
    multiscale_decompose,
    selective_scan_chunked,
    selective_scan_recurrent,
)
from miras.errors import SpecError
from miras.params import count_params, state_size_bytes
from miras.spec import MSSSMSpec, load_spec

D64 = torch.float64


def _scan_inputs(B=2, T=11, G=3, E=4, N=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, G, E, generator=g, dtype=D64)
    dt = F.softplus(torch.randn(B, T, G, E, generator=g, dtype=D64))
    A = -torch.rand(G, E, N, generator=g, dtype=D64) * 3
    Bm = torch.randn(B, T, G, N, generator=g, dtype=D64)
    Cm = torch.randn(B, T, G, N, generator=g, dtype=D64)
    h0 = torch.randn(B, G, E, N, generator=g, dtype=D64)
    return u, dt, A, Bm, Cm, h0


def test_recurrent_oracle_matches_closed_form():
    """h_t = exp(L_t) h_0 + sum_{tau<=t} exp(L_t - L_tau) dt_tau u_tau B_tau with L_t = sum_{s<=t} dt_s A."""
    u, dt, A, Bm, Cm, h0 = _scan_inputs(B=1, T=6)
    y, hT = selective_scan_recurrent(u, dt, A, Bm, Cm, h0)
    L = (dt[..., None] * A).cumsum(1)  # [B, T, G, E, N]
    for t in range(6):
        h = L[:, t].exp() * h0
        for tau in range(t + 1):
            h = h + (L[:, t] - L[:, tau]).exp() * (dt[:, tau] * u[:, tau])[..., None] * Bm[:, tau, :, None, :]
        assert torch.allclose(y[:, t], torch.einsum("bgen,bgn->bge", h, Cm[:, t]), atol=1e-12)
    assert torch.allclose(hT, h, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 11, 16])
def test_parallel_scan_equals_recurrent(chunk):
    args = _scan_inputs()
    y_ref, h_ref = selective_scan_recurrent(*args)
    y, h = selective_scan_chunked(*args, chunk_size=chunk)
    assert torch.allclose(y, y_ref, atol=1e-12) and torch.allclose(h, h_ref, atol=1e-12)


def test_parallel_scan_is_stable_under_strong_decay():
    """dt A down to -200 per token: the prefix scan multiplies transitions in (0, 1], nothing overflows in float32."""
    u, dt, A, Bm, Cm, h0 = (a.float() for a in _scan_inputs(T=16))
    y, h = selective_scan_chunked(u, dt * 50, A * 20, Bm, Cm, h0, chunk_size=16)
    y_ref, _ = selective_scan_recurrent(u, dt * 50, A * 20, Bm, Cm, h0)
    assert torch.isfinite(y).all() and torch.allclose(y, y_ref, atol=1e-4, rtol=1e-4)


def test_decomposition_matches_explicit_sum():
    """a_s[t] = sum_j w_a[j] a_{s-1}[t - (L-1-j) 2^(s-1)], d_s likewise, zero before the sequence start."""
    g = torch.Generator().manual_seed(0)
    S, E, L, B, T = 3, 2, 3, 1, 13
    w = torch.randn(S, E, 2, L, generator=g, dtype=D64)
    u = torch.randn(B, T, E, generator=g, dtype=D64)
    out, _ = multiscale_decompose(u, w)
    a = u
    for s in range(S):
        dil = 2**s
        nxt, det = torch.zeros_like(a), torch.zeros_like(a)
        for t in range(T):
            for j in range(L):
                src = t - (L - 1 - j) * dil
                if src >= 0:
                    nxt[:, t] += w[s, :, 0, j] * a[:, src]
                    det[:, t] += w[s, :, 1, j] * a[:, src]
        assert torch.allclose(out[:, :, s], det, atol=1e-12)
        a = nxt
    assert torch.allclose(out[:, :, S], a, atol=1e-12)
    # splitting the sequence and carrying the per-level contexts gives the same scales
    o1, ctx = multiscale_decompose(u[:, :5], w)
    o2, _ = multiscale_decompose(u[:, 5:], w, ctx)
    assert torch.allclose(torch.cat([o1, o2], 1), out, atol=1e-12)


def test_scale_dependent_init():
    """Coarser scales start with transitions exp(dt A) closer to 1 (slower forgetting): dt halves with every scale."""
    torch.manual_seed(0)
    mixer = MSSSMMixer(MSSSMSpec(scales=3, d_state=4), d_model=16)
    dt = F.softplus(mixer.dt_bias)  # dt at a zero input: [G, E]
    decay = torch.exp(dt[..., None] * -torch.exp(mixer.A_log)).mean((1, 2))  # [G]
    assert torch.allclose(dt[1:], dt[:-1] / 2, rtol=1e-5)
    assert (decay[1:] > decay[:-1]).all()


def test_gradcheck_scan_and_decomposition():
    u, dt, A, Bm, Cm, h0 = (a.requires_grad_() for a in _scan_inputs(B=1, T=4, G=2, E=2, N=2, seed=1))
    assert torch.autograd.gradcheck(lambda *a: selective_scan_chunked(*a, chunk_size=3)[0], (u, dt, A, Bm, Cm, h0),
                                    eps=1e-6, atol=1e-6, fast_mode=True)
    w = torch.randn(2, 2, 2, 2, dtype=D64, requires_grad=True)
    x = torch.randn(1, 5, 2, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, x: multiscale_decompose(x, w)[0], (w, x), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


def test_gradcheck_mixer():
    torch.manual_seed(0)
    mixer = MSSSMMixer(MSSSMSpec(scales=2, d_state=2, chunk_size=2), d_model=3).double()
    x = torch.randn(1, 4, 3, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mixer(x)[0], (x,), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("mixer_kind", ["softmax", "linear"])
def test_mixer_parallel_recurrent_and_decoding_agree(mixer_kind):
    torch.manual_seed(0)
    mixer = MSSSMMixer(MSSSMSpec(scales=2, kernel_size=3, d_state=3, chunk_size=4, mixer=mixer_kind), d_model=6).double()
    x = torch.randn(2, 10, 6, dtype=D64)
    full, _ = mixer(x)
    ref, _ = mixer(x, recurrent=True)
    assert torch.allclose(full, ref, atol=1e-12)
    state, outs = None, []
    for t in range(10):
        y, state = mixer(x[:, t : t + 1], state)
        outs.append(y)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-12)


def test_softmax_mixer_is_a_convex_combination():
    """With every scale giving the same output, the softmax scale mixer returns it unchanged."""
    torch.manual_seed(0)
    mixer = MSSSMMixer(MSSSMSpec(scales=2, gate=False), d_model=4).double()
    x = torch.randn(2, 5, 4, dtype=D64)
    w = mixer.scale_weights(x)
    assert torch.allclose(w.sum(-1), torch.ones(2, 5, dtype=D64)) and (w > 0).all()
    y = torch.randn(2, 5, 1, 4, dtype=D64).expand(-1, -1, 3, -1)
    assert torch.allclose(torch.einsum("btg,btge->bte", w, y), y[:, :, 0])


@pytest.mark.parametrize("layout", [["msssm"], ["mag"], ["mal", "msssm"]])
def test_model_count_state_and_decoding(layout):
    ms = {"scales": 2, "kernel_size": 2, "d_state": 3, "dt_rank": 2}
    spec = load_spec({"vocab_size": 29, "d_model": 8, "n_heads": 2, "n_layers": len(layout), "max_seq_len": 32,
                      "layout": layout, "hybrid_memory": "msssm", "msssm": ms,
                      "attention": {"window": 4, "persistent_tokens": 1}})
    torch.manual_seed(0)
    model = build(spec).double()
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    E, G, N, _ = msssm_dims(spec.msssm, 8)
    per_layer = G * E * N + E * (1 + 2)  # SSM states + the dilated-conv buffers (contexts 1 and 2)
    kv = sum(2 * 4 * 2 * 4 for b in spec.blocks if b in ("mag", "mal"))
    assert state_size_bytes(spec, 10, dtype_bytes=1) == len(layout) * per_layer + kv
    ids = torch.randint(0, 29, (2, 7))
    assert torch.allclose(logits_in_pieces(model, ids, [1] * 7), model(ids), atol=1e-9)


def test_spec_errors_name_the_field():
    with pytest.raises(SpecError, match=r"hybrid_memory: a mac block"):
        load_spec({"layout": ["mac"], "hybrid_memory": "msssm", "max_seq_len": 64})
    with pytest.raises(SpecError, match=r"msssm\.dt_min"):
        load_spec({"layout": ["msssm"], "msssm": {"dt_min": 0.5, "dt_max": 0.1}})
    with pytest.raises(SpecError, match=r"msssm\.scales"):
        load_spec({"layout": ["msssm"], "msssm": {"scales": 0}})
    with pytest.raises(SpecError, match=r"msssm\.mixer"):
        load_spec({"layout": ["msssm"], "msssm": {"mixer": "max"}})
