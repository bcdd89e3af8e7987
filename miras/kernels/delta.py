"""The exact online delta rule (DeltaNet, Gated DeltaNet) and DGD on the linear memory's kernels.

``learner.chunk_size: 1`` with the L2 bias and plain GD on a linear memory, retention none or a head keep gate: every
token takes its gradient at the state the token before it left (miras/ops_delta.py; Yang et al. 2024, arXiv:2406.06484,
§3; gated: arXiv:2412.06464, Eq. 10). Row convention ``y = k A``:

    P_t = alpha_t A_{t-1} (grad_at decayed) | A_{t-1} (previous),   A_t = alpha_t A_{t-1} + k_t^T u_t,
    u_t = eta_t (v_t - k_t P_t),   o_t = q_t A_t

In blocks of BT tokens with start state A_0 (c_t = sum_{s<=t} log alpha_s inside the block), the WY form
(``ops_delta.wy_solve``) gives every write at once, ``U = U_v - W_k A_0``. Then

    A_t = e^{c_t} A_0 - sum_{j<=t} e^{c_t - c_j} k_j^T R_j,   R = W_k A_0 - U_v,   o_t = q_t A_t

which is the linear family's chunk (miras/kernels/linear.py) with grad_at previous, learning rate 1, keep alpha and
the L2 bias R = y - v, on predictions y = kp A_0 whose keys are the rows of W_k (``kp``) against the values U_v. So
the WY blocks come first, one program per (chunk, batch*head) (``_wy_fwd_kernel``: T^{-1} = (I + L)^{-1} by forward
substitution, then W_k = T^{-1} diag(eta e^d) K and U_v = T^{-1} diag(eta) V on tensor cores; ``_wy_bwd_kernel``
their vector-Jacobian product from the saved T^{-1}), and the state passes, the reads and their backward run on the
linear kernels; the gradients of k, v, eta and alpha add up over both. ``MIRAS_KERNEL_DELTA_WY=torch`` forms the
blocks with PyTorch's batched triangular solves and autograd instead (``ops_delta.wy_solve``, the chunked path's).
Every block size gives the same result up to rounding (``delta_chunk``).

DGD with its key projector on a linear memory (Nested Learning Eq. 57: A_t = (alpha_t I - eta_t k_t^T k_t) A_{t-1}
- eta_t g_t, g_t at the chunk start) with a dot or L2 bias is the same block with the keys weighted differently
(``ops_delta.dgd_point``): blocks of ``learner.chunk_size`` tokens, W_k = T^{-1} diag(eta (e^d + 1)) K (L2) or
diag(eta (e^d + e^c)) K (L2 at the decayed chunk start), d_t = c_{t-1}; with the dot bias it is the delta rule.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from miras.kernels.common import BIAS_CODES, _dot, chunk_block, chunk_rows, dot_prec, pow2_tile
from miras.kernels.settings import delta_chunk, env_choice


def wy_mode() -> str:
    """Where the WY blocks are formed: ``triton`` (the default, ``_wy_fwd_kernel`` / ``_wy_bwd_kernel``) or ``torch``
    (batched triangular solves and autograd: ``ops_delta.wy_solve``); ``MIRAS_KERNEL_DELTA_WY``."""
    return env_choice("MIRAS_KERNEL_DELTA_WY", ("triton", "torch"), "triton")


@triton.jit
def _wy_setup(k, eta, keep, c, T, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
              BK: tl.constexpr, HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr, PREC: tl.constexpr):
    """One block's rows and gates: token indices and mask, eta, c_t = sum_{s<=t} log alpha_s in the block, the
    gradient point's d_t (c_t decayed, c_{t-1} previous), the keys (fp32), and the factors of
    L[j, i] = eta_j E[j, i] A[j, i]: E = e^{d_j - c_i} (0 off the strict lower triangle) and A = K K^T."""
    i_bh = tl.program_id(1)
    p_g = (i_bh // H).to(tl.int64) * T * H + (i_bh % H).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    _, _, t_idx, t_ok, _ = chunk_rows(c, T, o_t, BT, CS)
    b_eta = tl.load(eta + p_g + t_idx * H, mask=t_ok, other=0.0)
    la = tl.zeros([BT], dtype=tl.float32)
    if HAS_KEEP:
        la = tl.log(tl.maximum(tl.load(keep + p_g + t_idx * H, mask=t_ok, other=1.0), 1.1754944e-38))
    cs = tl.cumsum(la, axis=0)
    d = cs
    if not DECAYED:
        d = cs - la
    qk_ok = t_ok[:, None] & (o_k < K)[None, :]
    b_k = tl.load(k + p_g * K + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0)
    strict = o_t[:, None] > o_t[None, :]
    E = tl.where(strict, tl.exp(tl.where(strict, d[:, None] - cs[None, :], 0.0)), 0.0)
    A = _dot(b_k, tl.trans(b_k), PREC)
    return p_g, o_t, o_k, t_idx, t_ok, qk_ok, b_eta, cs, d, b_k.to(tl.float32), E, A


@triton.jit
def _key_weight(cs, d, POINT: tl.constexpr):
    """The WY keys' weights w (``ops_delta.wy_solve``): e^d (POINT 0, the delta rule), e^d + 1 (1) or e^d + e^c (2):
    DGD's L2 rows at the block start or the decayed block start (``ops_delta.dgd_point``)."""
    w = tl.exp(d)
    if POINT == 1:
        w += 1.0
    if POINT == 2:
        w += tl.exp(cs)
    return w


@triton.jit
def _unit_lower_inverse(L, o_t, BT: tl.constexpr, SUB: tl.constexpr, PREC: tl.constexpr):
    """(I + L)^{-1} of a strictly lower-triangular [BT, BT] L. The diagonal blocks of SUB rows, D = I + (their part of
    L), by forward substitution, all blocks at once: step s fixes row s of every block (row = e_r - sum_{i<r} L[r, i]
    row i, one dot). Then with N = the rest of L, strictly block-lower, M = D^{-1} N is nilpotent (M^(BT/SUB) = 0), so
    (I + L)^{-1} = (I + M)^{-1} D^{-1} = (I - M + M^2 - ...) D^{-1}: a few dots, not BT - 1 row steps."""
    same = (o_t[:, None] // SUB) == (o_t[None, :] // SUB)
    Lb = tl.where(same, L, 0.0)
    Di = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    for s in range(1, SUB):
        rows = (o_t % SUB) == s
        Di = tl.where(rows[:, None], Di - _dot(tl.where(rows[:, None], Lb, 0.0), Di, PREC), Di)
    M = _dot(Di, tl.where(same, 0.0, L), PREC)
    term = -M
    P = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0) + term
    for _ in tl.static_range(2, BT // SUB):
        term = -_dot(term, M, PREC)
        P += term
    return _dot(P, Di, PREC)


@triton.jit
def _wy_fwd_kernel(k, v, eta, keep, wk, uv, tinv, T, NT,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr,
                   PREC: tl.constexpr, PREC32: tl.constexpr, POINT: tl.constexpr = 0):
    """The WY form of one block (grid: chunks x batch*heads): T^{-1} = (I + L)^{-1} (``_unit_lower_inverse``), then
    W_k = T^{-1} diag(eta w) K (w: ``_key_weight``), U_v = T^{-1} diag(eta) V.
    Stores W_k (wk's dtype), U_v (fp32) and T^{-1} ([B*H, NT, BT, BT] fp32, for the backward)."""
    c = tl.program_id(0)
    p_g, o_t, o_k, t_idx, t_ok, qk_ok, b_eta, cs, d, b_k, E, A = _wy_setup(
        k, eta, keep, c, T, H, K, BT, CS, BK, HAS_KEEP, DECAYED, PREC)
    Ti = _unit_lower_inverse(b_eta[:, None] * E * A, o_t, BT, 16, PREC32)
    o_v = tl.arange(0, BV)
    tv_ok = t_ok[:, None] & (o_v < V)[None, :]
    b_v = tl.load(v + p_g * V + t_idx[:, None] * H * V + o_v[None, :], mask=tv_ok, other=0.0).to(tl.float32)
    W = _dot(Ti, (b_eta * _key_weight(cs, d, POINT))[:, None] * b_k, PREC32)
    U = _dot(Ti, b_eta[:, None] * b_v, PREC32)
    tl.store(wk + p_g * K + t_idx[:, None] * H * K + o_k[None, :], W.to(wk.dtype.element_ty), mask=qk_ok)
    tl.store(uv + p_g * V + t_idx[:, None] * H * V + o_v[None, :], U, mask=tv_ok)
    tl.store(tinv + (tl.program_id(1).to(tl.int64) * NT + c) * BT * BT + o_t[:, None] * BT + o_t[None, :], Ti)


@triton.jit
def _wy_bwd_kernel(k, v, eta, keep, tinv, dwk, duv, dk, dv, deta, dkeep, da, T, NT,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr,
                   PREC: tl.constexpr, PREC32: tl.constexpr, POINT: tl.constexpr = 0):
    """The vector-Jacobian product of ``_wy_fwd_kernel`` for one block, with X = [U_v | W_k], R = [eta V | eta w K]
    (X = T^{-1} R, w = e^d [+ 1 | + e^c]: ``_key_weight``) and the saved T^{-1}:

        dR = T^{-T} dX,   dL = -(dR X^T) on the strict lower triangle,   L = eta_j E[j, i] A[j, i],  A = K K^T,
        dA = dL . eta E,   dK = eta w dR_k + dA K + dA^T K,   dV = eta dR_v,
        deta = sum(dR_v V) + w sum(dR_k K) + sum_i dL E A,   dd = eta e^d sum(dR_k K) + sum_i dL L,
        dc_i = dd_i [decayed] + eta_i e^{c_i} sum(dR_k K)_i [POINT 2] - sum_j (dL L)[j, i],
        dlog alpha = reverse cumsum(dc) [- dd, previous].

    No transpose of a dot result feeds a dot: T^{-T}, K^T and V^T are transposed loads, X^T = R^T T^{-T} is formed
    as such, and dA^T is read back transposed from the scratch ``da`` ([B*H, NT, BT, BT] fp32)."""
    c = tl.program_id(0)
    p_g, o_t, o_k, t_idx, t_ok, qk_ok, b_eta, cs, d, b_k, E, A = _wy_setup(
        k, eta, keep, c, T, H, K, BT, CS, BK, HAS_KEEP, DECAYED, PREC)
    o_v = tl.arange(0, BV)
    tv_ok = t_ok[:, None] & (o_v < V)[None, :]
    p_k = p_g * K + t_idx[:, None] * H * K + o_k[None, :]
    p_v = p_g * V + t_idx[:, None] * H * V + o_v[None, :]
    p_kT = p_g * K + t_idx[None, :] * H * K + o_k[:, None]  # the same tiles read transposed: [BK, BT], [BV, BT]
    p_vT = p_g * V + t_idx[None, :] * H * V + o_v[:, None]
    p_blk = (tl.program_id(1).to(tl.int64) * NT + c) * BT * BT
    TiT = tl.load(tinv + p_blk + o_t[None, :] * BT + o_t[:, None])
    ed = tl.exp(d)
    w = _key_weight(cs, d, POINT)
    dRk = _dot(TiT, tl.load(dwk + p_k, mask=qk_ok, other=0.0).to(tl.float32), PREC32)  # [BT, BK]
    dRv = _dot(TiT, tl.load(duv + p_v, mask=tv_ok, other=0.0).to(tl.float32), PREC32)
    rkT = (b_eta * w)[None, :] * tl.load(k + p_kT, mask=t_ok[None, :] & (o_k < K)[:, None], other=0.0).to(tl.float32)
    rvT = b_eta[None, :] * tl.load(v + p_vT, mask=t_ok[None, :] & (o_v < V)[:, None], other=0.0).to(tl.float32)
    dL = -(_dot(dRv, _dot(rvT, TiT, PREC32), PREC32) + _dot(dRk, _dot(rkT, TiT, PREC32), PREC32))
    dL = tl.where(o_t[:, None] > o_t[None, :], dL, 0.0)
    dA = dL * b_eta[:, None] * E
    tl.store(da + p_blk + o_t[:, None] * BT + o_t[None, :], dA)
    tl.debug_barrier()
    dAT = tl.load(da + p_blk + o_t[None, :] * BT + o_t[:, None])
    b_dk = (b_eta * w)[:, None] * dRk + _dot(dA, b_k, PREC32) + _dot(dAT, b_k, PREC32)
    b_v = tl.load(v + p_v, mask=tv_ok, other=0.0).to(tl.float32)
    kdr = tl.sum(dRk * b_k, axis=1)
    dLEA = dL * E * A
    b_deta = tl.sum(dRv * b_v, axis=1) + w * kdr + tl.sum(dLEA, axis=1)
    dLL = dLEA * b_eta[:, None]
    dd = b_eta * ed * kdr + tl.sum(dLL, axis=1)
    dc = dd - tl.sum(dLL, axis=0)
    if POINT == 2:
        dc += b_eta * tl.exp(cs) * kdr
    dla = tl.cumsum(dc, axis=0, reverse=True)
    if not DECAYED:
        dla -= dd
    tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=qk_ok)
    tl.store(dv + p_v, b_eta[:, None] * dRv, mask=tv_ok)
    tl.store(deta + p_g + t_idx * H, b_deta, mask=t_ok)
    if HAS_KEEP:
        b_keep = tl.load(keep + p_g + t_idx * H, mask=t_ok, other=1.0)
        tl.store(dkeep + p_g + t_idx * H, tl.where(b_keep > 1.1754944e-38, dla / b_keep, 0.0), mask=t_ok)


def _wy_prec(prec: str, prec32: str) -> str:
    """The WY kernels' dots of fp32 operands (T^{-1} and what it multiplies): single-pass tf32 for bf16 inputs (a
    third of the tensor-core work of 3xTF32 and none of its operand splitting: sm_90, D=128, blocks of 64, per
    program ~17k -> ~5k instructions forward, 10.4k -> 4.7k backward), else ``prec32`` (3xTF32 on GPU, exact in the
    interpreter)."""
    return "tf32" if prec == "bf16" else prec32


class WYFunction(torch.autograd.Function):
    """(k, v, eta, keep) -> (W_k [B, T, H, K] in k's dtype, U_v [B, T, H, V] fp32): the WY blocks of ``block``
    tokens (``_wy_fwd_kernel``; backward ``_wy_bwd_kernel`` from the saved T^{-1}), the keys weighted as ``point``
    says (``ops_delta.wy_solve``)."""

    @staticmethod
    def forward(ctx, block: int, decayed: bool, point: int, k, v, eta, keep):
        B, T, H, K = k.shape
        V = v.shape[-1]
        BT, NT = chunk_block(block), triton.cdiv(T, block)
        wk = torch.empty_like(k)
        uv = torch.empty(B, T, H, V, device=k.device, dtype=torch.float32)
        tinv = torch.empty(B * H, NT, BT, BT, device=k.device, dtype=torch.float32)
        ctx.consts = dict(H=H, K=K, V=V, BT=BT, CS=block, BK=pow2_tile(K), BV=pow2_tile(V),
                          HAS_KEEP=keep is not None, DECAYED=decayed, POINT=point,
                          PREC=dot_prec(k), PREC32=_wy_prec(dot_prec(k), dot_prec(uv)), num_warps=8)
        _wy_fwd_kernel[(NT, B * H)](k, v, eta, keep if keep is not None else eta, wk, uv, tinv, T, NT, **ctx.consts)
        ctx.save_for_backward(k, v, eta, keep, tinv)
        return wk, uv

    @staticmethod
    def backward(ctx, dwk, duv):
        k, v, eta, keep, tinv = ctx.saved_tensors
        B, T, H, K = k.shape
        dwk = torch.zeros_like(k) if dwk is None else dwk.contiguous()
        duv = torch.zeros(v.shape, device=v.device) if duv is None else duv.contiguous()
        dk = torch.empty_like(k)
        dv = torch.empty(v.shape, device=v.device, dtype=torch.float32)
        deta = torch.empty_like(eta)
        dkeep = torch.empty_like(keep) if keep is not None else None
        _wy_bwd_kernel[(tinv.shape[1], B * H)](
            k, v, eta, keep if keep is not None else eta, tinv, dwk, duv, dk, dv, deta,
            dkeep if dkeep is not None else deta, torch.empty_like(tinv), T, tinv.shape[1], **ctx.consts)
        return None, None, None, dk, dv.to(v.dtype), deta, dkeep


def _blocks(x: Tensor, n: int) -> Tensor:
    """[B, T, H, ...] -> [B, NB, H, n, ...] (fp32), the last block padded with zeros."""
    B, T = x.shape[:2]
    nb = -(-T // n)
    if nb * n != T:
        x = torch.cat([x, x.new_zeros(B, nb * n - T, *x.shape[2:])], dim=1)
    return x.float().reshape(B, nb, n, *x.shape[2:]).transpose(2, 3)


def _tokens(x: Tensor, T: int) -> Tensor:
    """The inverse of ``_blocks``: [B, NB, H, n, D] -> [B, T, H, D] (contiguous)."""
    B, nb, H, n, D = x.shape
    return x.transpose(2, 3).reshape(B, nb * n, H, D)[:, :T].contiguous()


def wy_blocks(spec) -> tuple[int, bool, int]:
    """(block, decayed, point) of the WY blocks of a spec: the online delta rule in blocks of ``delta_chunk()``
    tokens, its gradient point's d_t; DGD on a linear memory in blocks of its ``learner.chunk_size`` (its gradient
    point), d_t = c_{t-1} (the projector acts on A_{t-1}) and its keys weighted by ``ops_delta.dgd_point``."""
    from miras.ops_delta import dgd_point

    point = dgd_point(spec)
    if point is not None:
        return spec.learner.chunk_size, False, point
    return delta_chunk(), spec.retention.kind == "decay" and spec.retention.grad_at == "decayed", 0


def delta_scan(spec, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, keep: Tensor | None,
               h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """(o [B, T, H, V] in q's dtype, final A [B, H, K, V] fp32) of the exact delta rule, or of DGD on a linear memory
    (``wy_blocks``).

    q, k: [B, T, H, K]; v: [B, T, H, V]; eta, keep: fp32 [B, T, H] (keep None without retention); h0: fp32
    [B, H, K, V] or None."""
    from miras.kernels.linear import LinearConfig, LinearScanFunction
    from miras.ops_delta import block_decays, wy_solve

    T = q.shape[1]
    n, decayed, point = wy_blocks(spec)
    # the keys W_k only feed dots: in the inputs' dtype, as k (the values U_v stay fp32: R = W_k A_0 - U_v)
    if wy_mode() == "triton":
        W_k, U_v = WYFunction.apply(n, decayed, point, k, v, eta, keep)
    else:
        etab = _blocks(eta, n)
        log_a = _blocks(torch.log(keep.clamp_min(torch.finfo(torch.float32).tiny)), n) if keep is not None else \
            torch.zeros_like(etab)
        U_v, W_k = wy_solve(_blocks(k, n), _blocks(v, n), etab, *block_decays(log_a, decayed), point)
        W_k, U_v = _tokens(W_k, T).to(q.dtype), _tokens(U_v, T)
    # the linear kernels with the L2 bias, learning rate 1 and the gradient at the block start: R = W_k A_0 - U_v
    cfg = dataclasses.replace(LinearConfig.from_spec(spec), chunk=n, bias=BIAS_CODES["l2"], decayed=False)
    o, ht, _ = LinearScanFunction.apply(cfg, q, k, U_v, torch.ones_like(eta), keep, None, None, h0, None, W_k)
    return o, ht
