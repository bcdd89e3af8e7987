"""The chunk coefficients of the learners (``miras.components.learner``), float64.

The end-of-chunk rows (``*_e``, formed from the log-cumsums) must equal the rows of the full n x n coefficients at each
chunk's last real token, and the hand-written backward of the decay matrix must match autograd through its definition.
"""

from __future__ import annotations

import pytest
import torch

from miras.components.learner import GDLearner, MomentumLearner, _decay_matrix


def _reference_decay(logc: torch.Tensor) -> torch.Tensor:
    n = logc.shape[-2]
    diff = logc[..., :, None, :] - logc[..., None, :, :]
    mask = torch.ones(n, n, dtype=torch.bool).tril()[:, :, None]
    return torch.exp(diff.masked_fill(~mask, float("-inf")))


def test_decay_matrix_matches_its_definition_and_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    logc = torch.cumsum(torch.log(0.3 + 0.7 * torch.rand(2, 3, 9, 2, generator=gen, dtype=torch.float64)), -2)
    logc.requires_grad_(True)
    cot = torch.randn(2, 3, 9, 9, 2, generator=gen, dtype=torch.float64)
    got, ref = _decay_matrix(logc), _reference_decay(logc)
    assert torch.equal(got, ref)
    (g_got,) = torch.autograd.grad(got, logc, cot)
    (g_ref,) = torch.autograd.grad(ref, logc, cot)
    assert torch.allclose(g_got, g_ref, rtol=1e-12, atol=1e-12)


def test_decay_matrix_stays_finite_under_strong_decay_float32() -> None:
    # keep 0.01 over 64 tokens: exp(+295) above the diagonal overflows float32 before it is zeroed
    logc = torch.cumsum(torch.full((1, 64, 1), 0.01).log(), -2).requires_grad_(True)
    E = _decay_matrix(logc)
    E.sum().backward()
    assert torch.isfinite(E).all() and torch.isfinite(logc.grad).all()
    assert E[0, 5, 6, 0].item() == 0 and E[0, 6, 5, 0].item() == pytest.approx(0.01)


@pytest.mark.parametrize("learner", [GDLearner(None), MomentumLearner(None)], ids=["gd", "momentum"])
@pytest.mark.parametrize("R", [1, 3])
def test_end_rows_equal_the_rows_at_the_last_token(learner, R: int) -> None:
    gen = torch.Generator().manual_seed(1)
    NC, B, H, n = 3, 2, 2, 5
    log_keep = torch.log(0.6 + 0.4 * torch.rand(NC, B, H, n, R, generator=gen, dtype=torch.float64))
    lr = torch.rand(NC, B, H, n, generator=gen, dtype=torch.float64)
    mu = 0.3 + 0.6 * torch.rand(NC, B, H, n, generator=gen, dtype=torch.float64)
    last = torch.tensor([n - 1, n - 1, 2])  # a partial last chunk
    co = learner.coefficients(log_keep, lr, mu, last)
    full = learner.coefficients(log_keep, lr, mu)  # the generic n x n form, no end rows (N is formed here)
    ids = torch.arange(NC)
    torch.testing.assert_close(co.beta_e, full.beta[ids, :, :, last])
    torch.testing.assert_close(co.G_e, full.G[ids, :, :, last])
    torch.testing.assert_close(co.G, full.G)
    if co.f is not None:
        torch.testing.assert_close(co.f, full.f)
        torch.testing.assert_close(co.f_e, full.f[ids, :, :, last])
        torch.testing.assert_close(co.m_e, full.m[ids, :, :, last])
        torch.testing.assert_close(co.N_e, full.N.transpose(-1, -2)[ids, :, :, last])


@pytest.mark.parametrize("partial", [False, True])
def test_fused_momentum_coefficients_match_the_generic_form_with_gradients(partial: bool) -> None:
    """R = 1 with end rows takes ``_MomentumMix`` (hand-written backward); its values and the gradients of every
    output (G, f, G_e and the rows built from the log-cumsums) must equal autograd through the generic form."""
    gen = torch.Generator().manual_seed(2)
    NC, B, H, n = 3, 2, 2, 7
    leaves = [
        torch.log(0.2 + 0.8 * torch.rand(NC, B, H, n, 1, generator=gen, dtype=torch.float64)),
        torch.rand(NC, B, H, n, generator=gen, dtype=torch.float64),
        0.1 + 0.85 * torch.rand(NC, B, H, n, generator=gen, dtype=torch.float64),
    ]
    for x in leaves:
        x.requires_grad_(True)
    last = torch.tensor([n - 1, n - 1, 3 if partial else n - 1])
    ids, learner = torch.arange(NC), MomentumLearner(None)
    fused, full = learner.coefficients(*leaves, last), learner.coefficients(*leaves)
    assert fused.N is None and full.N is not None  # the fused path was taken
    got = [fused.G, fused.f, fused.beta, fused.G_e, fused.f_e, fused.N_e, fused.beta_e, fused.m_e]
    ref = [full.G, full.f, full.beta, full.G[ids, :, :, last], full.f[ids, :, :, last],
           full.N.transpose(-1, -2)[ids, :, :, last], full.beta[ids, :, :, last], full.m[ids, :, :, last]]  # fmt: skip
    cots = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in ref]
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(sum((a * c).sum() for a, c in zip(got, cots)), leaves, retain_graph=True)
    g_ref = torch.autograd.grad(sum((b * c).sum() for b, c in zip(ref, cots)), leaves, retain_graph=True)
    for a, b in zip(g_got, g_ref, strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-12
    # only some outputs used (the others' gradients arrive as None)
    (g_one,) = torch.autograd.grad((fused.G_e * cots[3]).sum(), leaves[1])
    (r_one,) = torch.autograd.grad((ref[3] * cots[3]).sum(), leaves[1])
    torch.testing.assert_close(g_one, r_one, rtol=1e-12, atol=1e-12)


def test_gelu_with_grad_matches_torch() -> None:
    from miras.components.memory import gelu_with_grad

    gen = torch.Generator().manual_seed(3)
    z = (3 * torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)).requires_grad_(True)
    ch, cp = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    h, p = gelu_with_grad(z)
    z2 = z.detach().clone().requires_grad_(True)
    h_ref = torch.nn.functional.gelu(z2)
    (p_ref,) = torch.autograd.grad(h_ref.sum(), z2, create_graph=True)
    torch.testing.assert_close(h, h_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(p, p_ref, rtol=1e-13, atol=1e-13)
    (g,) = torch.autograd.grad((h * ch + p * cp).sum(), z)
    (g_ref,) = torch.autograd.grad((h_ref * ch + p_ref * cp).sum(), z2)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
