"""``memory_scan`` against the papers' update rules, written out here with plain loops and explicit gradients (float64).

Linear memory, row convention ``y = k W`` with ``W: [K, V]``; chunk size 1 (the online rules) unless stated.
"""

from __future__ import annotations

import pytest
import torch

from miras.ops import memory_scan
from miras.spec import MemorySpec

B, T, H, K, V = 1, 9, 2, 4, 5
MODES = ["recurrent", "chunked"]
DT = torch.float64


def spec_of(bias, retention, learner="gd", chunk=1) -> MemorySpec:
    return MemorySpec.model_validate(
        {"memory": "linear", "bias": bias, "retention": retention, "learner": {"kind": learner, "chunk_size": chunk}}
    )


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=DT)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=DT), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=DT)
    lr = 0.1 + 0.8 * torch.rand(B, T, H, generator=g, dtype=DT)
    keep = 0.6 + 0.39 * torch.rand(B, T, H, generator=g, dtype=DT)
    mu = 0.2 + 0.7 * torch.rand(B, T, H, generator=g, dtype=DT)
    delta = 0.2 + 1.5 * torch.rand(B, T, H, generator=g, dtype=DT)
    W0 = 0.5 * torch.randn(B, H, K, V, generator=g, dtype=DT)
    return q, k, v, lr, keep, mu, delta, W0


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def loop(step, W0, S0=None):
    """Run ``W, S = step(t, b, h, W, S)`` over tokens per (batch, head); returns the stacked outputs o_t = q_t W_t."""
    q = inputs()[0]
    o = torch.zeros(B, T, H, V, dtype=DT)
    finals = torch.zeros_like(W0)
    for b in range(B):
        for h in range(H):
            W = W0[b, h].clone()
            S = None if S0 is None else S0[b, h].clone()
            for t in range(T):
                W, S, W_read = step(t, b, h, W, S)
                o[b, t, h] = q[b, t, h] @ W_read
            finals[b, h] = W
    return o, finals


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("mode", MODES)
def test_dot_none_is_causal_linear_attention(mode, chunk):
    """l = -<kW, v>, no retention: W_t = W_{t-1} + eta_t k_t^T v_t, so o_t = sum_{i<=t} eta_i (q_t.k_i) v_i."""
    q, k, v, lr, *_ = inputs()
    spec = spec_of("dot", "none", chunk=chunk)
    o, _ = memory_scan(spec, q, k, v, {"lr": lr}, None, mode=mode)
    scores = torch.einsum("bthk,bshk->bhts", q, k) * lr.transpose(1, 2)[:, :, None, :]  # [B, H, t, s]
    scores = scores * torch.ones(T, T, dtype=torch.bool).tril()
    ref = torch.einsum("bhts,bshv->bthv", scores, v)
    assert rel(o, ref) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_deltanet(mode):
    """DeltaNet (Schlag et al. 2021): W_t = W_{t-1} + eta_t k_t^T (v_t - k_t W_{t-1})."""
    q, k, v, lr, keep, mu, delta, W0 = inputs()

    def step(t, b, h, W, S):
        kt, vt, e = k[b, t, h], v[b, t, h], lr[b, t, h]
        W = W + e * torch.outer(kt, vt - kt @ W)
        return W, S, W

    ref_o, ref_W = loop(step, W0)
    o, st = memory_scan(spec_of("l2", "none"), q, k, v, {"lr": lr}, {"W1": W0}, mode=mode)
    assert rel(o, ref_o) < 1e-12 and rel(st["W1"], ref_W) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_gated_deltanet(mode):
    """Gated DeltaNet (Yang et al. 2024): W_t = alpha_t W_{t-1} + eta_t k_t^T (v_t - alpha_t k_t W_{t-1})."""
    q, k, v, lr, keep, mu, delta, W0 = inputs()

    def step(t, b, h, W, S):
        kt, vt, e, a = k[b, t, h], v[b, t, h], lr[b, t, h], keep[b, t, h]
        W = a * W + e * torch.outer(kt, vt - a * (kt @ W))
        return W, S, W

    ref_o, ref_W = loop(step, W0)
    spec = spec_of("l2", {"kind": "decay", "grad_at": "decayed"})
    o, st = memory_scan(spec, q, k, v, {"lr": lr, "keep": keep}, {"W1": W0}, mode=mode)
    assert rel(o, ref_o) < 1e-12 and rel(st["W1"], ref_W) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_titans_momentum_forgetting(mode):
    """Titans Eq. 12-14 in Titans' own symbols: l = ||k M - v||^2 (no 1/2), forget a_t = 1 - alpha_t, surprise decay
    eta^T_t = mu_t, step theta_t = eta_t / 2 (our l2 has the 1/2):
        S_t = eta^T_t S_{t-1} - theta_t grad l(M_{t-1}),   M_t = (1 - a_t) M_{t-1} + S_t."""
    q, k, v, lr, keep, mu, delta, W0 = inputs()
    S0 = 0.1 * torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(5), dtype=DT)

    def step(t, b, h, M, S):
        kt, vt = k[b, t, h], v[b, t, h]
        a_t, eta_t, theta_t = 1 - keep[b, t, h], mu[b, t, h], lr[b, t, h] / 2
        grad = 2 * torch.outer(kt, kt @ M - vt)
        S = eta_t * S - theta_t * grad
        M = (1 - a_t) * M + S
        return M, S, M

    ref_o, ref_W = loop(step, W0, S0)
    spec = spec_of("l2", {"kind": "decay", "grad_at": "previous"}, learner="momentum")
    gates = {"lr": lr, "keep": keep, "momentum": mu}
    o, st = memory_scan(spec, q, k, v, gates, {"W1": W0, "S1": S0}, mode=mode)
    assert rel(o, ref_o) < 1e-12 and rel(st["W1"], ref_W) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_moneta(mode):
    """Moneta (Miras Eq. 24-25), p = 3, q = 4: A_t = alpha_t A_{t-1} - eta_t grad l_p(W_{t-1}), W_t = A_t / ||A_t||_4^2,
    with Remark 5's smoothing sign(r) ~ tanh(a r), |r| ~ sqrt(r^2 + eps) (Eq. 11), and eps inside the norm."""
    q, k, v, lr, keep, mu, delta, W0 = inputs()
    p, a_s, eps, eps_q = 3.0, 10.0, 1e-6, 1e-6

    def nu(A):
        return ((A.abs() ** 4).sum() + eps_q) ** 0.5  # ||A||_4^(4-2)

    def step(t, b, h, A, S):
        W = A / nu(A)
        kt, vt = k[b, t, h], v[b, t, h]
        r = kt @ W - vt
        grad = torch.outer(kt, p * torch.tanh(a_s * r) * torch.sqrt(r * r + eps) ** (p - 1))
        A = keep[b, t, h] * A - lr[b, t, h] * grad
        return A, S, A / nu(A)

    ref_o, ref_A = loop(step, W0)
    spec = spec_of({"kind": "lp", "p": p, "smoothing": a_s, "eps": eps}, {"kind": "lq", "q": 4.0, "eps": eps_q})
    o, st = memory_scan(spec, q, k, v, {"lr": lr, "keep": keep}, {"W1": W0}, mode=mode)
    assert rel(o, ref_o) < 1e-11 and rel(st["W1"], ref_A) < 1e-11


@pytest.mark.parametrize("mode", MODES)
def test_yaad(mode):
    """Yaad (Miras Eq. 26): W_t = alpha_t W_{t-1} - eta_t * (grad l2 if ||r||_2 <= delta_t else delta_t grad l1),
    l1's sign smoothed by tanh(a r)."""
    q, k, v, lr, keep, mu, delta, W0 = inputs()
    a_s = 10.0
    branches = []

    def step(t, b, h, W, S):
        kt, vt, d = k[b, t, h], v[b, t, h], delta[b, t, h]
        r = kt @ W - vt
        inside = bool(r.norm() <= d)
        branches.append(inside)
        grad = torch.outer(kt, r) if inside else d * torch.outer(kt, torch.tanh(a_s * r))
        W = keep[b, t, h] * W - lr[b, t, h] * grad
        return W, S, W

    ref_o, ref_W = loop(step, W0)
    assert any(branches) and not all(branches), "the inputs must exercise both Huber branches"
    spec = spec_of({"kind": "huber", "smoothing": a_s}, "decay")
    o, st = memory_scan(spec, q, k, v, {"lr": lr, "keep": keep, "huber_delta": delta}, {"W1": W0}, mode=mode)
    assert rel(o, ref_o) < 1e-12 and rel(st["W1"], ref_W) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_memora(mode):
    """Memora (Miras Eq. 27): W_t = c softmax(alpha_t log W_{t-1} - eta_t grad l2(W_{t-1})), softmax over each row."""
    q, k, v, lr, keep, mu, delta, _ = inputs()
    c = 2.0
    W0 = c * torch.softmax(torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(3), dtype=DT), dim=-1)

    def step(t, b, h, W, S):
        kt, vt = k[b, t, h], v[b, t, h]
        grad = torch.outer(kt, kt @ W - vt)
        logits = keep[b, t, h] * torch.log(W) - lr[b, t, h] * grad
        W = c * torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
        return W, S, W

    ref_o, ref_W = loop(step, W0)
    spec = spec_of("l2", {"kind": "kl", "scale": c})
    o, st = memory_scan(spec, q, k, v, {"lr": lr, "keep": keep}, {"W1": W0}, mode=mode)
    assert rel(o, ref_o) < 1e-12 and rel(st["W1"], ref_W) < 1e-12
    assert torch.allclose(st["W1"].sum(-1), torch.full((B, H, K), c, dtype=DT))


@pytest.mark.parametrize("mode", MODES)
def test_elastic_net(mode):
    """Elastic-net retention (Miras Eq. 22): W_t = S_gamma(alpha_t W_{t-1} - eta_t grad), soft threshold per head."""
    q, k, v, lr, keep, mu, delta, W0 = inputs()
    gamma = torch.tensor([0.01, 0.05], dtype=DT)

    def step(t, b, h, W, S):
        kt, vt = k[b, t, h], v[b, t, h]
        z = keep[b, t, h] * W - lr[b, t, h] * torch.outer(kt, kt @ W - vt)
        W = torch.where(z.abs() > gamma[h], z - gamma[h] * torch.sign(z), torch.zeros_like(z))
        return W, S, W

    ref_o, ref_W = loop(step, W0)
    spec = spec_of("l2", "elastic")
    o, st = memory_scan(spec, q, k, v, {"lr": lr, "keep": keep}, {"W1": W0}, params={"threshold": gamma}, mode=mode)
    assert rel(o, ref_o) < 1e-12 and rel(st["W1"], ref_W) < 1e-12
    assert (st["W1"] == 0).any(), "the threshold must zero some entries (hard forgetting)"


@pytest.mark.parametrize("chunk", [3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_chunk_formula(mode, chunk):
    """Chunk-wise GD (Titans Eq. 16 / Miras Eq. 28), gradients at the chunk-start state W_c:
    W_t = (beta_t / beta_c) W_c - sum_{c < i <= t} eta_i (beta_t / beta_i) grad l2(W_c; k_i, v_i)."""
    q, k, v, lr, keep, mu, delta, W0 = inputs()
    ref_o = torch.zeros(B, T, H, V, dtype=DT)
    ref_W = torch.zeros_like(W0)
    for b in range(B):
        for h in range(H):
            beta = torch.cumprod(keep[b, :, h], 0)  # beta_i = prod_{j<=i} alpha_j
            Wc = W0[b, h]
            for c0 in range(0, T, chunk):
                beta_c = beta[c0 - 1] if c0 > 0 else torch.tensor(1.0, dtype=DT)
                idx = range(c0, min(c0 + chunk, T))
                grads = {i: torch.outer(k[b, i, h], k[b, i, h] @ Wc - v[b, i, h]) for i in idx}
                for t in idx:
                    Wt = beta[t] / beta_c * Wc - sum(lr[b, i, h] * beta[t] / beta[i] * grads[i] for i in idx if i <= t)
                    ref_o[b, t, h] = q[b, t, h] @ Wt
                Wc = Wt
            ref_W[b, h] = Wc
    spec = spec_of("l2", "decay", chunk=chunk)
    o, st = memory_scan(spec, q, k, v, {"lr": lr, "keep": keep}, {"W1": W0}, mode=mode)
    assert rel(o, ref_o) < 1e-12 and rel(st["W1"], ref_W) < 1e-12
    # and it is not the online rule: chunking changes the result
    o1, _ = memory_scan(spec_of("l2", "decay", chunk=1), q, k, v, {"lr": lr, "keep": keep}, {"W1": W0}, mode=mode)
    assert rel(o1, ref_o) > 1e-3
