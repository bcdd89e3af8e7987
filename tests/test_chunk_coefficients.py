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
    ids = torch.arange(NC)
    torch.testing.assert_close(co.beta_e, co.beta[ids, :, :, last])
    torch.testing.assert_close(co.G_e, co.G[ids, :, :, last])
    if co.f is not None:
        torch.testing.assert_close(co.f_e, co.f[ids, :, :, last])
        torch.testing.assert_close(co.m_e, co.m[ids, :, :, last])
        torch.testing.assert_close(co.N_e, co.N.transpose(-1, -2)[ids, :, :, last])


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
