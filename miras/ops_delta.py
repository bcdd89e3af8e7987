"""The exact online delta rule in blocks (DeltaNet, Gated DeltaNet): ``chunk_size: 1`` computed in parallel.

With ``learner.chunk_size == 1`` every token takes its gradient at the state left by the token before it (the pure
online rule). For a linear memory with the L2 bias and plain GD that rule is affine in the state, and a block of n
tokens can be solved at once (the UT / WY form of Yang et al. 2024, "Parallelizing Linear Transformers with the Delta
Rule", arXiv:2406.06484, §3; gated: Yang, Kautz, Hatamizadeh 2024, arXiv:2412.06464, Eq. 10). Row convention
``y = k A`` with A ``[K, V]``; per token (Miras Eq. 9 with the decayed gradient point, or Titans Eq. 13 without):

    P_t = alpha_t A_{t-1} (grad_at decayed)  |  A_{t-1} (grad_at previous)
    A_t = alpha_t A_{t-1} + k_t^T u_t,   u_t = eta_t (v_t - k_t P_t),   o_t = q_t A_t

Inside a block with start state A_0, c_t = sum_{s<=t} log alpha_s and d_t = c_t (decayed) or c_{t-1} (previous):

    A_t = e^{c_t} A_0 + sum_{i<=t} e^{c_t - c_i} k_i^T u_i
    (I + L) U = diag(eta) V - diag(eta e^{d}) K A_0,   L[j, i] = eta_j e^{d_j - c_i} (k_j . k_i)   (i < j)
    O = diag(e^{c}) Q A_0 + (e^{c_t - c_i} q_t . k_i)_{i<=t} U ;   A_n = e^{c_n} A_0 + (e^{c_n - c} * K)^T U

Everything but the three products with A_0 is computed for all blocks at once (one batched unit-triangular solve);
the loop over blocks runs four matmuls. Tokens padded onto the last block have eta = 0 and alpha = 1, so they write
nothing. Tested against the token-by-token oracle in float64 (tests/test_ops_delta.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from miras.ops_common import Prepared, chunk_major
from miras.spec import MemorySpec

BLOCK = 32  # tokens solved at once; any value gives the same result (up to rounding)


def is_delta_rule(spec: MemorySpec) -> bool:
    """The online (chunk 1) delta rule this module solves in blocks: linear memory, L2 bias, GD learner, retention none
    or decay (DeltaNet, Gated DeltaNet)."""
    return (
        spec.learner.chunk_size == 1
        and spec.memory.kind == "linear"
        and spec.bias.kind == "l2"
        and spec.learner.kind == "gd"
        and spec.retention.kind in ("none", "decay")
    )


def exact_delta_applies(spec: MemorySpec, p: Prepared) -> bool:
    """:func:`is_delta_rule` with one keep value per head (a channel-wise keep takes the generic chunk-1 loop)."""
    return is_delta_rule(spec) and (p.keep is None or p.keep.shape[-1] == 1)


def dgd_point(spec: MemorySpec) -> int | None:
    r"""DGD with its key projector on a linear memory (NL Eq. 57) as WY blocks of ``learner.chunk_size`` tokens: the
    ``point`` of ``wy_solve``, or None where the rule is not one (an MLP memory, ``mlp_form: none``, a bias whose
    rows are not affine in the state, retention other than none / decay).

    Per token A_t = alpha_t A_{t-1} + k_t^T u_t with u_t = -eta_t (k_t A_{t-1} + R_t), R_t the bias row at the
    chunk's gradient point: -v_t (dot), k_t A_0 - v_t (L2, grad_at previous), e^{c_t} k_t A_0 - v_t (L2, decayed).
    The projector's k_t A_{t-1} gives the delta rule's triangular system with d_t = c_{t-1}, and R is affine in A_0:

        (I + L) U = diag(eta) V - diag(eta w) K A_0,   w = e^d (dot: point 0), e^d + 1 (point 1), e^d + e^c (point 2)

    so a DGD chunk writes U = U_v - W_k A_0 as the delta rule's block does (with a dot bias it is the delta rule)."""
    learner, ret = spec.learner, spec.retention
    if learner.kind != "dgd" or learner.mlp_form != "first_layer" or spec.memory.kind != "linear":
        return None
    if spec.bias.kind not in ("dot", "l2") or ret.kind not in ("none", "decay"):
        return None
    if spec.bias.kind == "dot":
        return 0
    return 2 if ret.kind == "decay" and ret.grad_at == "decayed" else 1


def block_decays(log_a: Tensor, decayed: bool) -> tuple[Tensor, Tensor]:
    """(c, d) of blocks from the log keep gates ``[..., n]``: c_t = sum_{s<=t} log alpha_s, and the gradient point's
    d_t = c_t (grad_at decayed) or c_{t-1} (previous)."""
    c = torch.cumsum(log_a, dim=-1)
    return c, (c if decayed else c - log_a)


def masked_decay(rows: Tensor, c: Tensor, mask: Tensor) -> Tensor:
    """exp(rows_j - c_i) where ``mask[j, i]``, else 0: ``[..., n, n]`` from ``[..., n]`` (never exp of a positive
    difference off the mask)."""
    return torch.exp((rows[..., :, None] - c[..., None, :]).masked_fill(~mask, float("-inf")))


def wy_solve(kb: Tensor, vb: Tensor, eta: Tensor, c: Tensor, d: Tensor, point: int = 0) -> tuple[Tensor, Tensor]:
    """The WY form of blocks of n tokens (leading dims batch the blocks): ``(U_v, W_k)`` with

        (I + L) [U_v | W_k] = [diag(eta) V | diag(eta w) K],   L[j, i] = eta_j e^{d_j - c_i} (k_j . k_i)   (i < j)

    so that a block with start state A_0 writes ``U = U_v - W_k A_0`` (Yang et al. 2024, arXiv:2406.06484, §3).
    The key weights are w = e^d (``point`` 0: the delta rule) or, for DGD's L2 rows taken at the block start, w = e^d
    + 1 (``point`` 1) or e^d + e^c (``point`` 2: at the decayed block start; ``dgd_point``).
    kb ``[..., n, K]``, vb ``[..., n, V]``; eta, c, d ``[..., n]``."""
    n = kb.shape[-2]
    strict = torch.ones(n, n, dtype=torch.bool, device=kb.device).tril(-1)
    L = eta[..., :, None] * masked_decay(d, c, strict) * (kb @ kb.transpose(-1, -2))
    eye = torch.eye(n, dtype=kb.dtype, device=kb.device)
    w = torch.exp(d) + (0.0, 1.0, torch.exp(c))[point]
    rhs = torch.cat([eta[..., None] * vb, (eta * w)[..., None] * kb], dim=-1)  # [eta V | eta w K]
    sol = torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)
    return sol[..., : vb.shape[-1]], sol[..., vb.shape[-1] :]


def delta_rule_scan(spec: MemorySpec, p: Prepared, reads: bool = True, block: int = BLOCK) -> tuple[Tensor | None, Tensor]:
    """Blocked exact delta rule. Returns (o ``[B, H, T, V]`` or None, final A ``[B, H, K, V]``)."""
    B, H, T, K = p.q.shape
    n = min(block, T)
    nb = -(-T // n)
    kb, vb = chunk_major(p.k, nb, n, 0.0), chunk_major(p.v, nb, n, 0.0)  # [NB, B, H, n, K|V]
    eta = chunk_major(p.lr, nb, n, 0.0)  # [NB, B, H, n]
    if p.keep is not None:
        log_a = chunk_major(torch.log(p.keep[..., 0].clamp_min(torch.finfo(p.keep.dtype).tiny)), nb, n, 0.0)
    else:
        log_a = torch.zeros_like(eta)
    c, d = block_decays(log_a, getattr(spec.retention, "grad_at", "decayed") == "decayed")
    U_v, W_k = wy_solve(kb, vb, eta, c, d)  # U = U_v - W_k A_0
    c_end = c[..., -1:]  # [NB, B, H, 1]
    K_end = (torch.exp(c_end - c)[..., None] * kb).transpose(-1, -2)  # [NB, B, H, K, n]
    g_end = torch.exp(c_end)[..., None]  # [NB, B, H, 1, 1]
    if reads:
        causal = torch.ones(n, n, dtype=torch.bool, device=c.device).tril()
        qb = chunk_major(p.q, nb, n, 0.0)
        M = masked_decay(c, c, causal) * (qb @ kb.transpose(-1, -2))  # [NB, B, H, n, n]
        Qg = torch.exp(c)[..., None] * qb

    A = p.W[0]
    outs = []
    for i in range(nb):
        U = U_v[i] - W_k[i] @ A
        if reads:
            outs.append(Qg[i] @ A + M[i] @ U)
        A = g_end[i] * A + K_end[i] @ U
    o = torch.cat(outs, dim=2)[:, :, :T] if reads else None
    return o, A
