"""Learning rules: how the inner gradient g_t updates the memory (Titans Eq. 8-14, Miras §4 "memory algorithm").

    gd        A_t = alpha_t A_{t-1} - eta_t g_t
    momentum  S_t = mu_t S_{t-1} - eta_t g_t ;  A_t = alpha_t A_{t-1} + S_t     (Titans Eq. 13-14, alpha = 1 - a_titans)

Chunked form (papers.md §1.4.1, deep-memory-dual-form.md): inside a chunk of n tokens with gradients g_j at the chunk start,

    A_t = beta_t A_0 + f_t S_0 - sum_j G[t, j] g_j ,   S_t = m_t S_0 - sum_j N[j, t] g_j
    E[t, r] = prod_{l=r+1..t} alpha_l (r <= t),  N[j, r] = eta_j prod_{l=j+1..r} mu_l (r >= j),  G = E N^T
    beta_t = prod_{l<=t} alpha_l,  m_r = prod_{l<=r} mu_l,  f = E m           (GD: N = diag(eta), f = 0)

computed from log-cumsums. A trailing axis R of the keep gate (1, or K for channel-wise keep) carries through E, beta, f, G.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from miras.registry import LEARNER


@dataclass
class ChunkCoefficients:
    """Gate coefficients of chunks (any leading dims ``...``, e.g. ``B, H, n_chunks``).

    beta, f ``[..., n, R]``; G ``[..., t, j, R]``; m ``[..., n]``; N ``[..., j, r]``.
    """

    beta: Tensor
    G: Tensor
    f: Tensor | None = None
    m: Tensor | None = None
    N: Tensor | None = None


def _decay_matrix(logc: Tensor) -> Tensor:
    """``E[..., t, r, R] = exp(sum_{l=r+1..t} log alpha_l)`` for r <= t, else 0. logc: cumsum ``[..., n, R]``."""
    n = logc.shape[-2]
    diff = logc[..., :, None, :] - logc[..., None, :, :]  # [..., t, r, R]
    mask = torch.ones(n, n, dtype=torch.bool, device=logc.device).tril()[:, :, None]
    return torch.exp(diff.masked_fill(~mask, float("-inf")))


class Learner:
    gates: ClassVar[tuple[str, ...]] = ("lr",)
    momentum: ClassVar[bool] = False

    def __init__(self, spec) -> None:
        self.spec = spec

    def coefficients(self, log_keep: Tensor, lr: Tensor, mu: Tensor | None = None) -> ChunkCoefficients:
        """log_keep ``[..., n, R]``, lr and mu ``[..., n]``."""
        raise NotImplementedError

    def step(self, A: Tensor, S: Tensor | None, g: Tensor, keep: Tensor, lr: Tensor, mu: Tensor | None):
        """One token of the recurrence (the oracle): returns (A, S). keep broadcasts against A's rows."""
        raise NotImplementedError


@LEARNER.register("gd")
class GDLearner(Learner):
    """Plain gradient descent on the inner objective."""

    def coefficients(self, log_keep, lr, mu=None):
        logc = torch.cumsum(log_keep, dim=-2)  # [..., n, R]
        E = _decay_matrix(logc)  # [..., t, j, R]
        return ChunkCoefficients(beta=torch.exp(logc), G=E * lr[..., None, :, None])

    def step(self, A, S, g, keep, lr, mu=None):
        return keep * A - lr * g, None


@LEARNER.register("momentum")
class MomentumLearner(Learner):
    """Gradient descent with momentum (Titans' past + momentary surprise)."""

    gates: ClassVar[tuple[str, ...]] = ("lr", "momentum")
    momentum: ClassVar[bool] = True

    def coefficients(self, log_keep, lr, mu=None):
        logc = torch.cumsum(log_keep, dim=-2)  # [..., n, R]
        E = _decay_matrix(logc)  # [..., t, r, R]
        logm = torch.cumsum(torch.log(mu.clamp_min(torch.finfo(mu.dtype).tiny)), dim=-1)  # [..., n]
        Mm = _decay_matrix(logm[..., None])[..., 0]  # [..., r, j] = prod_{l=j+1..r} mu_l
        N = Mm.transpose(-1, -2) * lr[..., :, None]  # [..., j, r]
        G = torch.einsum("...trk,...jr->...tjk", E, N)  # [..., t, j, R]
        m = torch.exp(logm)  # [..., n]
        f = torch.einsum("...trk,...r->...tk", E, m)  # [..., n, R]
        return ChunkCoefficients(beta=torch.exp(logc), G=G, f=f, m=m, N=N)

    def step(self, A, S, g, keep, lr, mu=None):
        S = mu * S - lr * g
        return keep * A + S, S
