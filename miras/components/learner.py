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
    """Gate coefficients of chunks (any leading dims ``...``, e.g. ``n_chunks, B, H`` in ``ops_chunked``).

    beta, f ``[..., n, R]``; G ``[..., t, j, R]``; m ``[..., n]``; N ``[..., j, r]``; the end-of-chunk rows (``*_e``) are
    formed from the log-cumsums (O(n) per chunk, plus one n x n product for G_e), never by indexing n x n tensors.
    """

    beta: Tensor
    G: Tensor
    f: Tensor | None = None
    m: Tensor | None = None
    N: Tensor | None = None
    # the rows of the last token of each chunk (end-of-chunk state), when ``coefficients`` is given ``last``:
    # beta_e, f_e ``[..., R]``, G_e ``[..., j, R]``, m_e ``[...]``, N_e ``[..., j]``
    beta_e: Tensor | None = None
    G_e: Tensor | None = None
    f_e: Tensor | None = None
    m_e: Tensor | None = None
    N_e: Tensor | None = None


class _DecayMatrix(torch.autograd.Function):
    """``E = exp(logc_t - logc_r)`` on r <= t, 0 above, with the backward written out: ``g = dE ⊙ E``,
    ``dlogc = sum_r g[:, r] - sum_t g[t, :]`` (three passes over the n x n tensor instead of autograd's five)."""

    generate_vmap_rule = True  # usable under torch.func transforms as well

    @staticmethod
    def forward(logc: Tensor) -> Tensor:
        n = logc.shape[-2]
        E = torch.exp(logc[..., :, None, :] - logc[..., None, :, :])  # above the diagonal it may overflow: zeroed next
        return E.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=logc.device).triu(1)[:, :, None], 0.0)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (E,) = ctx.saved_tensors
        g = grad * E
        return g.sum(-2) - g.sum(-3)


def _decay_matrix(logc: Tensor) -> Tensor:
    """``E[..., t, r, R] = exp(sum_{l=r+1..t} log alpha_l)`` for r <= t, else 0. logc: cumsum ``[..., n, R]``."""
    return _DecayMatrix.apply(logc)


def _end_rows(logc: Tensor, last: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """At the last token e of each chunk: ``logc_e`` ``[..., R]``, ``E[e, r]`` ``[..., r, R]``, mask r <= e ``[NC, 1, 1, n]``.

    logc ``[NC, B, H, n, R]`` (chunk-major); last ``[NC]`` (the index of each chunk's last real token). Formed from the
    cumsums, so that no n x n tensor is indexed (whose backward would fill a full-size zero tensor).
    """
    n = logc.shape[-2]
    logc_e = logc[torch.arange(len(last), device=last.device), :, :, last]  # [NC, B, H, R]
    valid = (torch.arange(n, device=last.device) <= last[:, None])[:, None, None, :]  # [NC, 1, 1, n]
    E_e = torch.exp((logc_e[..., None, :] - logc).masked_fill(~valid[..., None], float("-inf")))  # [NC, B, H, r, R]
    return logc_e, E_e, valid


class Learner:
    gates: ClassVar[tuple[str, ...]] = ("lr",)
    momentum: ClassVar[bool] = False

    def __init__(self, spec) -> None:
        self.spec = spec

    def coefficients(
        self, log_keep: Tensor, lr: Tensor, mu: Tensor | None = None, last: Tensor | None = None
    ) -> ChunkCoefficients:
        """log_keep ``[..., n, R]``, lr and mu ``[..., n]``; with ``last`` ``[NC]`` (leading dims ``NC, B, H``) also the
        end-of-chunk rows at token ``last[c]`` of chunk c."""
        raise NotImplementedError

    def step(self, A: Tensor, S: Tensor | None, g: Tensor, keep: Tensor, lr: Tensor, mu: Tensor | None):
        """One token of the recurrence (the oracle): returns (A, S). keep broadcasts against A's rows."""
        raise NotImplementedError


@LEARNER.register("gd")
class GDLearner(Learner):
    """Plain gradient descent on the inner objective."""

    def coefficients(self, log_keep, lr, mu=None, last=None):
        logc = torch.cumsum(log_keep, dim=-2)  # [..., n, R]
        E = _decay_matrix(logc)  # [..., t, j, R]
        co = ChunkCoefficients(beta=torch.exp(logc), G=E * lr[..., None, :, None])
        if last is not None:
            logc_e, E_e, _ = _end_rows(logc, last)
            co.beta_e, co.G_e = torch.exp(logc_e), E_e * lr[..., None]
        return co

    def step(self, A, S, g, keep, lr, mu=None):
        return keep * A - lr * g, None


@LEARNER.register("momentum")
class MomentumLearner(Learner):
    """Gradient descent with momentum (Titans' past + momentary surprise)."""

    gates: ClassVar[tuple[str, ...]] = ("lr", "momentum")
    momentum: ClassVar[bool] = True

    def coefficients(self, log_keep, lr, mu=None, last=None):
        logc = torch.cumsum(log_keep, dim=-2)  # [..., n, R]
        E = _decay_matrix(logc)  # [..., t, r, R]
        logm = torch.cumsum(torch.log(mu.clamp_min(torch.finfo(mu.dtype).tiny)), dim=-1)  # [..., n]
        Mm = _decay_matrix(logm[..., None]).squeeze(-1)  # [..., r, j] = prod_{l=j+1..r} mu_l
        N = Mm.transpose(-1, -2) * lr[..., :, None]  # [..., j, r]
        m = torch.exp(logm)  # [..., n]
        if E.shape[-1] == 1:  # G = E N^T and f = E m in one product
            G, f = (E.squeeze(-1) @ torch.cat([N.transpose(-1, -2), m[..., None]], dim=-1)).split([N.shape[-1], 1], dim=-1)
            G = G[..., None]
        else:
            G = torch.einsum("...trk,...jr->...tjk", E, N)  # [..., t, j, R]
            f = torch.einsum("...trk,...r->...tk", E, m)  # [..., n, R]
        co = ChunkCoefficients(beta=torch.exp(logc), G=G, f=f, m=m, N=N)
        if last is not None:
            logc_e, E_e, valid = _end_rows(logc, last)
            ids = torch.arange(len(last), device=last.device)
            logm_e = logm[ids, :, :, last]  # [NC, B, H]
            co.N_e = lr * torch.exp((logm_e[..., None] - logm).masked_fill(~valid, float("-inf")))  # [..., j]
            co.beta_e, co.m_e, co.f_e = torch.exp(logc_e), torch.exp(logm_e), (E_e * m[..., None]).sum(-2)
            # G_e[j] = sum_r N[j, r] E_e[r]: elementwise for R = 1 (a matrix-vector bmm is several times slower here)
            co.G_e = (N * E_e.transpose(-1, -2)).sum(-1, keepdim=True) if E_e.shape[-1] == 1 else N @ E_e  # [..., j, R]
        return co

    def step(self, A, S, g, keep, lr, mu=None):
        S = mu * S - lr * g
        return keep * A + S, S


# ------------------------------------------------------------------------------------------ ATLAS Muon and NL DGD

NS_COEFFICIENTS = {"quintic": (3.4445, -4.7750, 2.0315), "cubic": (1.5, -0.5, 0.0)}
NS_EPS = 1e-7


def newton_schulz(S: Tensor, steps: int, coefficients: str = "quintic") -> Tensor:
    """``NS_k(S)`` per matrix over the last two axes (Muon; ATLAS Eq. 32-33, papers.md §3.4).

    ``X = S / sqrt(||S||_F^2 + eps^2)`` (eps keeps a zero momentum at zero with a finite gradient); transpose if rows >
    cols; k times ``A = X X^T; B = b A + c A A; X = a X + B X``. ``quintic`` (3.4445, -4.7750, 2.0315) pushes the singular
    values into ~[0.7, 1.2] quickly (Muon); ``cubic`` (1.5, -0.5, 0) converges to exactly 1, i.e. to the polar factor
    U V^T of S = U Sigma V^T.
    """
    a, b, c = NS_COEFFICIENTS[coefficients]
    X = S / torch.sqrt((S * S).sum((-2, -1), keepdim=True) + NS_EPS**2)
    tall = S.shape[-2] > S.shape[-1]
    if tall:
        X = X.transpose(-1, -2)
    for _ in range(steps):
        A = X @ X.transpose(-1, -2)
        B = b * A + c * (A @ A) if c else b * A
        X = a * X + B @ X
    return X.transpose(-1, -2) if tall else X


@LEARNER.register("muon")
class MuonLearner(Learner):
    """ATLAS' Muon rule, descent-consistent reading of Eq. 32-33 (the NS of a descent direction is a descent direction):

        S_t = mu_t S_{t-1} - eta_t g_t ;   A_t = alpha_t A_{t-1} + NS_k(S_t)

    Not linear in the gradients: the chunked form materialises the momentum of every token of a chunk (``miras.ops_ext``).
    """

    gates: ClassVar[tuple[str, ...]] = ("lr", "momentum")
    momentum: ClassVar[bool] = True

    def orthogonalize(self, S: Tensor) -> Tensor:
        return newton_schulz(S, self.spec.steps, self.spec.coefficients)

    def step(self, A, S, g, keep, lr, mu=None):
        S = mu * S - lr * g
        return keep * A + self.orthogonalize(S), S


@LEARNER.register("dgd")
class DGDLearner(Learner):
    """Delta gradient descent (Nested Learning Eq. 57) in the [K, V] row convention of miras:

        A_t = (alpha_t I - eta_t k_t^T k_t) A_{t-1} - eta_t g_t

    The projector acts on the key side (the input side of the first layer of an MLP memory with ``mlp_form:
    first_layer``; the other layers take plain GD). Chunk semantics: g_t is taken at the chunk-start state (as for every
    learner) while the projector is applied token-exactly; the chunked form solves the resulting unit lower-triangular
    system (the UT transform of DeltaNet, ``miras.ops_ext``).
    """

    def projects(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) takes the key projector."""
        return layer == 0 and self.spec.mlp_form == "first_layer"

    def step(self, A, S, g, keep, lr, mu=None, *, k: Tensor | None = None, layer: int = 0):
        A_new = keep * A - lr * g
        if k is not None and self.projects(layer):  # k [B, H, 1, K]
            A_new = A_new - lr * (k.transpose(-1, -2) @ (k @ A))
        return A_new, None
