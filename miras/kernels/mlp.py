"""Triton kernels of the 2-layer MLP memory (forward and backward) and their autograd Function.

Memory ``M(x) = [x +] act(x W1) W2`` with W1: [K, Hd], W2: [Hd, V] per head (Titans §3.1, Miras §5.3; no LayerNorm
head). Every gradient of a chunk is taken at the chunk-start state (Titans Eq. 16, Miras Eq. 28) and the reads with
per-token weights are masked b x b products (the dual form, shared/reference/deep-memory-dual-form.md). Per chunk, with
gamma = beta (grad_at decayed) or 1 and the gate coefficients beta, f, G (m, N for momentum) of common.gate_coeffs:

    Z1 = gamma (k W1),  A1 = act(Z1),  Y = gamma (A1 W2) [+ k],  R = dl/dy (Y; v)           (forward at the chunk start)
    D1 = gamma (R W2^T) * act'(Z1)                                        (hand backward; rank-one factors (k, D1), (A1, R))
    H = beta (q W1) + f (q S1) - (G . q k^T) D1,  O = beta (act(H) W2) + f (act(H) S2) - (G . act(H) A1^T) R [+ q]
    W1' = beta_L W1 + f_L S1 - k^T diag(g_L) D1,   W2' = beta_L W2 + f_L S2 - A1^T diag(g_L) R
    S1' = m_L S1 - k^T diag(n_L) D1,               S2' = m_L S2 - A1^T diag(n_L) R               (momentum)

The state is too large for registers at D=128 (W1, W2: 2 x 128 x 256 fp32), so it lives in global memory: every chunk
reads the hidden dim in tiles of BH columns of W1 / rows of W2, twice (pass 1 sums Y over the tiles; pass 2 builds D1,
the read and the end state per tile). The forward stores every chunk-start state ([B*H, NT+1, ...] fp32, slot NT is the
final state); without gradients two ping-pong slots suffice.

Two layouts of the same math (``layout()``, env ``MIRAS_KERNEL_MLP_LAYOUT``): "tiles", the default, in
miras/kernels/mlp_tiles.py (the hidden tiles of the loops below become a grid dimension, a few launches per chunk),
and "walk", the kernels of this module (one program per batch*head walks the chunks; MODE constexpr):
  forward  MODE 0 fused walk (outputs + states), 1 state pass only, 2 outputs of one chunk per program (after MODE 1);
           the default is 1 then 2 (``MIRAS_KERNEL_SPLIT=0``: 0).
  backward one reverse walk: per chunk, pass 1 recomputes Y, pass 2 the read and every term that needs only R (the
           chunk-start state gradients without the dY part, a [BT, Hd] scratch of the dZ1 part), then the bias'
           vector-Jacobian product dR -> dY, and pass 3 adds the dY terms. The end-state gradients travel between
           chunks in two ping-pong slots in global memory.
The second-order terms (D1 depends on W1, W2 through act'(Z1) and R) use act''; the derivation was checked against
torch.autograd on the PyTorch chunk body in float64.

Ref: Behrouz et al. 2024, "Titans", arXiv:2501.00663 (Eq. 13-16); Behrouz et al. 2025, "It's All Connected"
(Miras), arXiv:2504.13173 (Eq. 28); dual form: Sun et al. 2024 (TTT), arXiv:2407.04620.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import cache, partial

import torch
import triton
import triton.language as tl

from miras.kernels.common import (
    HAS_GDC,
    RuleConfig,
    _dot,
    _row_select,
    _tanh,
    _vec_select,
    bias_rows,
    bias_rows_bwd,
    chunk_block,
    chunk_rows,
    gate_coeffs,
    gate_coeffs_t,
    gate_grads,
    interpreting,
    pow2_tile,
    store_gate_grads,
)
from miras.kernels.graphs import GraphCache
from miras.kernels.launcher import BoundLaunch
from miras.kernels.settings import env_choice, env_switch, env_tile, launch_config

ACT_CODES = {"gelu": 0, "silu": 1, "tanh": 2, "relu": 3}


@dataclass(frozen=True, kw_only=True)
class MLPConfig(RuleConfig):
    """Static choices of one MLP-memory kernel call (all become constexprs): RuleConfig's fields plus the memory's."""

    act: int  # ACT_CODES
    residual: bool
    hidden: int
    norm: bool = False  # the LayerNorm head (tiles layout only; docs/kernels-ln-head.md)
    r16: bool = False  # the tiles layout's records keep R in bf16 (``mlp_tiles.r_dtype``; set per call, forward and
    # backward alike: MLPScanFunction)

    @classmethod
    def from_spec(cls, spec, d_key: int) -> MLPConfig:
        """The kernel choices of a MemorySpec (2-layer MLP memory; see miras.kernels.kernel_support)."""
        from miras.components.memory import hidden_width

        mem = spec.memory
        return cls(act=ACT_CODES[mem.activation], residual=bool(mem.residual), hidden=hidden_width(spec, d_key),
                   norm=bool(mem.norm), **cls.choices(spec))  # fmt: skip


# ------------------------------------------------------------------------------------------------------- activations


@triton.jit
def _tanh_acc(z):
    """tanh with full relative precision near 0 (the one-exp form loses it to 1 - exp(-2|z|) for small |z|)."""
    z2 = z * z
    small = z * (1.0 + z2 * (-0.3333333333333333 + z2 * (0.13333333333333333 - 0.05396825396825397 * z2)))
    return tl.where(tl.abs(z) < 0.125, small, _tanh(z))


@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z): 0 gelu (exact erf), 1 silu, 2 tanh, 3 relu."""
    if ACT == 0:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 1:
        return z * tl.sigmoid(z)
    elif ACT == 2:
        return _tanh_acc(z)
    else:
        return tl.maximum(z, 0.0)


@triton.jit
def _act_d1(z, ACT: tl.constexpr):
    """act'(z)."""
    if ACT == 0:
        return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 1:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == 2:
        t = _tanh_acc(z)
        return 1.0 - t * t
    else:
        return tl.where(z > 0, 1.0, 0.0)


@triton.jit
def _act_d2(z, ACT: tl.constexpr):
    """act''(z) (the second-order term of the backward: D1 depends on Z1 through act')."""
    if ACT == 0:
        return 0.3989422804014327 * tl.exp(-0.5 * z * z) * (2.0 - z * z)
    elif ACT == 1:
        s = tl.sigmoid(z)
        return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    elif ACT == 2:
        t = _tanh_acc(z)
        return -2.0 * t * (1.0 - t * t)
    else:
        return tl.zeros_like(z)


# ------------------------------------------------------------------------------------- one hidden tile (both layouts)
# The math of one hidden tile j of a chunk (W1_j = W1[:, tile], W2_j = W2[tile, :]), shared by the walk (which loops
# over the tiles and sums) and the tiles layout (one program per tile; its sums over the hidden dim are contractions
# by separate kernels on the stored factors, mlp_tiles.py).


@triton.jit
def _state_tiles(w1s, w2s, s1s, s2s, o1, o2, w1_off, w1_ok, w2_off, w2_ok, MOMENTUM: tl.constexpr):
    """Tile j of (W1, W2) at slot offsets o1 / o2 and of (S1, S2) at the same offsets of s1s / s2s (momentum; else
    W1, W2 stand in, unread), as fp32 (the tiles layout's saved slots may be bf16: ``mlp_tiles.saved_states_dtype``).
    Also serves the state-gradient slots."""
    W1 = tl.load(w1s + o1 + w1_off, mask=w1_ok, other=0.0).to(tl.float32)
    W2 = tl.load(w2s + o2 + w2_off, mask=w2_ok, other=0.0).to(tl.float32)
    S1, S2 = W1, W2
    if MOMENTUM:
        S1 = tl.load(s1s + o1 + w1_off, mask=w1_ok, other=0.0).to(tl.float32)
        S2 = tl.load(s2s + o2 + w2_off, mask=w2_ok, other=0.0).to(tl.float32)
    return W1, W2, S1, S2


@triton.jit
def _store_state_tiles(w1s, w2s, s1s, s2s, o1, o2, w1_off, w1_ok, w2_off, w2_ok, W1, W2, S1, S2,
                       MOMENTUM: tl.constexpr):
    """``_state_tiles``' inverse: tile j of (W1, W2) and, with momentum, of (S1, S2) into the slots at offsets o1 / o2,
    in each buffer's dtype."""
    if MOMENTUM:
        tl.store(s1s + o1 + w1_off, S1.to(s1s.dtype.element_ty), mask=w1_ok)
        tl.store(s2s + o2 + w2_off, S2.to(s2s.dtype.element_ty), mask=w2_ok)
    tl.store(w1s + o1 + w1_off, W1.to(w1s.dtype.element_ty), mask=w1_ok)
    tl.store(w2s + o2 + w2_off, W2.to(w2s.dtype.element_ty), mask=w2_ok)


@triton.jit
def _operand(x, DEFER: tl.constexpr):
    """x, or (DEFER) the block that the pointer tensor x points to, loaded here, where a dot uses it: a block loaded at
    the top of a kernel keeps its shared-memory copy from there to its use (+16 KB per [64, 64] fp32 block at sm_90)."""
    if DEFER:
        return tl.load(x).to(tl.float32)  # (a bf16 block of mlp_tiles.operands_dtype: the dot rounds to it anyway)
    else:
        return x


@triton.jit
def _read_hidden(qj, W1, S1, C1, D1, beta, f, ACT: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr,
                 DEFER: tl.constexpr):
    """The dual-form read's hidden activation on tile j: Ah = act(beta q W1_j + f q S1_j - C1 D1) (C1 = G . q k^T;
    D1: ``_fwd_tile_math``). DEFER: C1 is a pointer tensor to the block (``_operand``)."""
    Hh = beta[:, None] * _dot(qj, W1, PREC) - _dot(_operand(C1, DEFER), D1, PREC)
    if MOMENTUM:
        Hh += f[:, None] * _dot(qj, S1, PREC)
    return _act(Hh, ACT)


@triton.jit
def _fwd_tile_math(qj, kj, Rj, W1, W2, S1, S2, gam, beta, f, C1, gL, nL, betaL, fL, mL,
                   ACT: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr, WANT_O: tl.constexpr,
                   DEFER: tl.constexpr):
    """Forward of tile j: A1 = act(Z1), Z1 = gamma (k W1_j); D1 = gamma (R W2_j^T) act'(Z1); the read's
    H = beta q W1_j + f q S1_j - C1 D1 (C1 = G . q k^T) and Ah = act(H) (WANT_O, ``_read_hidden``; its parts of o:
    ``_fwd_tile_out``; else Ah = 0) and the tile's end state (W1', W2', S1', S2'). Returns (A1, Ah, D1, W1', W2',
    S1', S2'). DEFER: C1 is a pointer tensor to the block (``_operand``)."""
    Z1 = gam[:, None] * _dot(kj, W1, PREC)
    A1 = _act(Z1, ACT)
    D1 = gam[:, None] * _dot(Rj, tl.trans(W2), PREC) * _act_d1(Z1, ACT)
    Ah = tl.zeros_like(D1)
    if WANT_O:
        Ah = _read_hidden(qj, W1, S1, C1, D1, beta, f, ACT, MOMENTUM, PREC, DEFER)
    # the token weights scale the per-tile factor (D1, A1), so k^T and Rj are the only loop-invariant operands
    W1n = betaL * W1 - _dot(tl.trans(kj), gL[:, None] * D1, PREC)
    W2n = betaL * W2 - _dot(tl.trans(A1 * gL[:, None]), Rj, PREC)
    S1n = S1
    S2n = S2
    if MOMENTUM:
        W1n += fL * S1
        W2n += fL * S2
        S1n = mL * S1 - _dot(tl.trans(kj), nL[:, None] * D1, PREC)
        S2n = mL * S2 - _dot(tl.trans(A1 * nL[:, None]), Rj, PREC)
    return A1, Ah, D1, W1n, W2n, S1n, S2n


@triton.jit
def _fwd_tile_out(A1, Ah, W2, S2, beta, f, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Hidden tile j's parts of the read's sums over the hidden dim: Ah (beta W2_j + f S2_j) and SA = Ah A1^T (the
    read is O = sum_j Ah (beta W2_j + f S2_j) - (G . sum_j SA_j) R [+ q])."""
    O = beta[:, None] * _dot(Ah, W2, PREC)
    if MOMENTUM:
        O += f[:, None] * _dot(Ah, S2, PREC)
    return O, _dot(Ah, tl.trans(A1), PREC)


@triton.jit
def _end_grad_terms(W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, betaL, fL, mL, MOMENTUM: tl.constexpr):
    """What the end state's gradient (tile j) carries into the start state's, through W' = beta_L W + f_L S and
    S' = m_L S: (beta_L dW1e, beta_L dW2e, f_L dW1e + m_L dS1e, f_L dW2e + m_L dS2e); without momentum S1, S2 stand
    in for the last two. The scalars' gradients: ``_end_grad_products``."""
    dS1 = S1
    dS2 = S2
    if MOMENTUM:
        dS1 = fL * dW1e + mL * dS1e
        dS2 = fL * dW2e + mL * dS2e
    return betaL * dW1e, betaL * dW2e, dS1, dS2


@triton.jit
def _end_grad_products(W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e):
    """The elementwise products whose sums over all tiles are the gradients of the carry scalars:
    d beta_L = <dW', W>, d f_L = <dW', S>, d m_L = <dS', S> (W1 and W2 parts of each; ``_end_grad_scalars``)."""
    return dW1e * W1, dW2e * W2, dW1e * S1, dW2e * S2, dS1e * S1, dS2e * S2


@triton.jit
def _full_sum(x):
    """Sum of every element of a 2-D tile."""
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _end_grad_scalars(W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, MOMENTUM: tl.constexpr):
    """Tile j's parts of (d beta_L, d f_L, d m_L) (``_end_grad_products``; 0, 0 for f_L, m_L without momentum)."""
    bL1, bL2, fL1, fL2, mL1, mL2 = _end_grad_products(W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e)
    dbL = _full_sum(bL1) + _full_sum(bL2)
    dfL = dbL * 0.0
    dmL = dbL * 0.0
    if MOMENTUM:
        dfL = _full_sum(fL1) + _full_sum(fL2)
        dmL = _full_sum(mL1) + _full_sum(mL2)
    return dbL, dfL, dmL


@triton.jit
def _state_grad_terms(qj, doj, Rj, Ah, dH, dP, beta, f, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Tile j's start-state gradient terms through the chunk's read and R (pass 2's factors Ah, dH, dP):
    dW1 = q^T (beta dH), dW2 = (beta Ah)^T dO + dP^T R, dS1 = q^T (f dH), dS2 = (f Ah)^T dO (momentum; else dW1, dW2
    stand in)."""
    dW1 = _dot(tl.trans(qj), beta[:, None] * dH, PREC)
    dW2 = _dot(tl.trans(Ah * beta[:, None]), doj, PREC) + _dot(tl.trans(dP), Rj, PREC)
    dS1 = dW1
    dS2 = dW2
    if MOMENTUM:
        dS1 = _dot(tl.trans(qj), f[:, None] * dH, PREC)
        dS2 = _dot(tl.trans(Ah * f[:, None]), doj, PREC)
    return dW1, dW2, dS1, dS2


@triton.jit
def _bwd_tile_read(qj, kj, doj, Rj, W1, W2, S1, S2, gam, beta, f, C1, C1T, M2, M2T,
                   ACT: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr, DEFER: tl.constexpr):
    """The half of pass 2 of hidden tile j that the end state's gradient does not enter: the forward's Zk = k W1_j,
    Pm = R W2_j^T, A1, D1 (Z1 = gamma Zk), the read's Ah and its backward dH, and the read's parts of dA1 and dD1,
    dA1r = M2^T Ah and dD1r = -C1^T dH. Returns (Zk, Pm, A1, Ah, D1, dH, dA1r, dD1r, dbeta, df rows). It depends
    on the chunk's inputs, its start state and dO only, so the tiles layout can run it for every chunk at once
    (``mlp_tiles._bwd_read``). DEFER: C1, C1T, M2, M2T are pointer tensors to the blocks (``_operand``)."""
    Zk = _dot(kj, W1, PREC)
    Z1 = gam[:, None] * Zk
    A1 = _act(Z1, ACT)
    Pm = _dot(Rj, tl.trans(W2), PREC)
    D1 = gam[:, None] * Pm * _act_d1(Z1, ACT)
    QW1 = _dot(qj, W1, PREC)
    Hh = beta[:, None] * QW1 - _dot(_operand(C1, DEFER), D1, PREC)
    dOW2 = _dot(doj, tl.trans(W2), PREC)
    dAh = beta[:, None] * dOW2 + _dot(_operand(M2, DEFER), A1, PREC)
    if MOMENTUM:
        QS1 = _dot(qj, S1, PREC)
        Hh += f[:, None] * QS1
        dOS2 = _dot(doj, tl.trans(S2), PREC)
        dAh += f[:, None] * dOS2
    Ah = _act(Hh, ACT)
    dH = dAh * _act_d1(Hh, ACT)
    dbeta = tl.sum(Ah * dOW2 + dH * QW1, axis=1)
    df = tl.zeros_like(dbeta)
    if MOMENTUM:
        df += tl.sum(Ah * dOS2 + dH * QS1, axis=1)
    dA1r = _dot(_operand(M2T, DEFER), Ah, PREC)
    dD1r = -_dot(_operand(C1T, DEFER), dH, PREC)
    return Zk, Pm, A1, Ah, D1, dH, dA1r, dD1r, dbeta, df


@triton.jit
def _bwd_tile_carry(kj, Rj, Z1, s1, Pm, A1, D1, dA1r, dD1r, dW1e, dW2e, dS1e, dS2e, gam, gL, nL,
                    ACT: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """The half of pass 2 of hidden tile j that the end state's gradient (dW1e, dW2e, dS1e, dS2e) enters, from the
    other half's (``_bwd_tile_read``; s1 = act'(Z1)): through W1' = .. - k^T diag(g_L) D1, W2' = .. - A1^T diag(g_L) R
    (and S1', S2' with n_L), dA1 = dA1r - g_L R dW2e^T - n_L R dS2e^T, dD1 = dD1r - g_L k dW1e - n_L k dS1e.
    Returns dP = gamma dD1 act'(Z1) (the factor of dR), the dgamma, d g_L, d n_L rows and
    X = dZ1 without its dY part."""
    RdW2 = _dot(Rj, tl.trans(dW2e), PREC)
    dA1 = dA1r - gL[:, None] * RdW2
    KdW1 = _dot(kj, dW1e, PREC)
    dD1 = dD1r - gL[:, None] * KdW1
    dgL = -tl.sum(KdW1 * D1 + A1 * RdW2, axis=1)
    dnL = tl.zeros_like(dgL)
    if MOMENTUM:
        RdS2 = _dot(Rj, tl.trans(dS2e), PREC)
        dA1 -= nL[:, None] * RdS2
        KdS1 = _dot(kj, dS1e, PREC)
        dD1 -= nL[:, None] * KdS1
        dnL -= tl.sum(KdS1 * D1 + A1 * RdS2, axis=1)
    dP = dD1 * gam[:, None] * s1
    dgam = tl.zeros_like(dgL)
    if DECAYED:
        dgam += tl.sum(dD1 * Pm * s1, axis=1)
    X = dD1 * gam[:, None] * Pm * _act_d2(Z1, ACT) + dA1 * s1
    return dP, dgam, dgL, dnL, X


@triton.jit
def _bwd_tile_factors(qj, kj, doj, Rj, W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, gam, beta, f, C1, C1T, M2, M2T,
                      gL, nL, betaL, fL, mL,
                      ACT: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr,
                      DEFER: tl.constexpr):
    """Backward of hidden tile j, every term that needs only R (pass 2) and only this tile (``_bwd_tile_read`` then
    ``_bwd_tile_carry``); (dW1e, dW2e, dS1e, dS2e): the tile of the end state's gradient; M2 = -G . dO R^T (M2T its
    transpose). Returns the tile's factors of the sums over tiles (A1, Ah, D1, dH, dP: ``_bwd_tile_sums``), its parts
    of the row sums (dbeta, df, dgamma, d g_L, d n_L rows and the d beta_L, d f_L, d m_L scalars), X = dZ1 without
    its dY part, and the start-state gradient tiles without their dY parts. DEFER: C1, C1T, M2, M2T are pointer
    tensors to the blocks (``_operand``).
    The tiles layout uses only the factors, X and the rows here (the rest is dead code there) and forms the
    start-state gradient tiles in pass 3 (``_state_grad_terms``, ``_end_grad_terms``), so that q, dO, R and the
    end-gradient tiles are not live through all of pass 2.

    Every row sum over V is a row sum over the tile's columns of a [BT, BH] product already formed, e.g.
    sum_v dO (Ah W2) = sum_h Ah (dO W2^T): no [BT, V] temporaries."""
    Zk, Pm, A1, Ah, D1, dH, dA1r, dD1r, dbeta, df = _bwd_tile_read(qj, kj, doj, Rj, W1, W2, S1, S2, gam, beta, f,
                                                                   C1, C1T, M2, M2T, ACT, MOMENTUM, PREC, DEFER)
    Z1 = gam[:, None] * Zk
    dP, dgam, dgL, dnL, X = _bwd_tile_carry(kj, Rj, Z1, _act_d1(Z1, ACT), Pm, A1, D1, dA1r, dD1r, dW1e, dW2e, dS1e,
                                            dS2e, gam, gL, nL, ACT, DECAYED, MOMENTUM, PREC)
    dW1c, dW2c, dS1c, dS2c = _end_grad_terms(W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, betaL, fL, mL, MOMENTUM)
    dbL, dfL, dmL = _end_grad_scalars(W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, MOMENTUM)
    dW1s, dW2s, dS1s, dS2s = _state_grad_terms(qj, doj, Rj, Ah, dH, dP, beta, f, MOMENTUM, PREC)
    return (A1, Ah, D1, dH, dP, dbeta, df, dgam, dgL, dnL, dbL, dfL, dmL, X, dW1s + dW1c, dW2s + dW2c, dS1s + dS1c,
            dS2s + dS2c)


@triton.jit
def _bwd_tile_sums(A1, Ah, D1, dH, dP, W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, beta, f, gL, nL,
                   MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Hidden tile j's parts of the backward's sums over the hidden dim, from its factors (``_bwd_tile_factors``):
    SA = Ah A1^T, SAT, dC1 = -dH D1^T, dC1T ([BT, BT]); dR = dP W2 - g_L A1 dW2e - n_L A1 dS2e ([BT, V]);
    dq = beta dH W1^T + f dH S1^T, dk = -g_L D1 dW1e^T - n_L D1 dS1e^T ([BT, K]). A caller that uses a few of them
    gets only those (the rest is dead code)."""
    SA = _dot(Ah, tl.trans(A1), PREC)
    SAT = _dot(A1, tl.trans(Ah), PREC)
    dC1 = -_dot(dH, tl.trans(D1), PREC)
    dC1T = -_dot(D1, tl.trans(dH), PREC)
    dq = beta[:, None] * _dot(dH, tl.trans(W1), PREC)
    dk = -_dot(gL[:, None] * D1, tl.trans(dW1e), PREC)
    dR = _dot(dP, W2, PREC) - _dot(gL[:, None] * A1, dW2e, PREC)
    if MOMENTUM:
        dq += f[:, None] * _dot(dH, tl.trans(S1), PREC)
        dk -= _dot(nL[:, None] * D1, tl.trans(dS1e), PREC)
        dR -= _dot(nL[:, None] * A1, dS2e, PREC)
    return SA, SAT, dC1, dC1T, dR, dq, dk


@triton.jit
def _bwd_chunk_dr(SAT, dR, b_do, GT, t_ok, o_r, o_t, PREC: tl.constexpr, DEFER: tl.constexpr):
    """dR less the read's part, (G . SA)^T dO, on the rows o_r of the chunk (0 on padding): the gradient at the record R
    that the bias VJP (``_bwd_chunk_dy``, or the LayerNorm head's in mlp_tiles) starts from."""
    causal_t = o_r[:, None] <= o_t[None, :]
    dR -= _dot(tl.where(causal_t, GT * _operand(SAT, DEFER), 0.0), b_do, PREC)
    return tl.where(t_ok[:, None], dR, 0.0)


@triton.jit
def _bwd_chunk_dy(SAT, dR, b_do, b_v, b_d, b_k, Y0, GT, gam, t_ok, o_r, o_t,
                  BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr, RES: tl.constexpr,
                  DECAYED: tl.constexpr, PREC: tl.constexpr, DEFER: tl.constexpr):
    """Between the two tile passes of the backward, from pass 2's sums over tiles (dR without the read's part, SA^T):
    dR -= (G . SA)^T dO, then the bias' vector-Jacobian product dR -> dY at Y = gamma Y0 [+ k]. Returns (dY, dV, the
    Huber deltas' gradient, dY's part of dgamma); with the residual, dk gets dY too (the caller's). On the rows o_r of
    the chunk (o_t: all its tokens; dR, v, k, Y0, gamma, t_ok and the rows of SAT, GT are those rows'; dO is the whole
    chunk's). DEFER: SAT is a pointer tensor to the block (``_operand``)."""
    dR = _bwd_chunk_dr(SAT, dR, b_do, GT, t_ok, o_r, o_t, PREC, DEFER)
    Y = gam[:, None] * Y0
    if RES:
        Y += b_k
    dY, dV, dd = bias_rows_bwd(Y, b_v, b_d, dR, BIAS, P, SMOOTH, EPS)
    dY = tl.where(t_ok[:, None], dY, 0.0)
    dgam = tl.zeros_like(gam)
    if DECAYED:
        dgam = tl.sum(dY * Y0, axis=1)
    return dY, dV, dd, dgam


@triton.jit
def _bwd_chunk_dg(SA, dC1, dC1T, dq, dk, b_q, b_k, b_do, R, G, GT, o_t, RES: tl.constexpr, PREC: tl.constexpr,
                  DEFER: tl.constexpr):
    """Between the two tile passes of the backward, from pass 2's sums over tiles: the gradient dG of the
    coefficient matrix and dq, dk's intra-chunk parts (dq also the residual's dO). Returns (dG, dq, dk). DEFER: SA,
    dC1, dC1T are pointer tensors to the blocks (``_operand``)."""
    causal = o_t[:, None] >= o_t[None, :]
    causal_t = o_t[:, None] <= o_t[None, :]
    dC1 = _operand(dC1, DEFER)
    dG = tl.where(causal, dC1 * _dot(b_q, tl.trans(b_k), PREC) - _dot(b_do, tl.trans(R), PREC) * _operand(SA, DEFER),
                  0.0)
    dq += _dot(tl.where(causal, dC1 * G, 0.0), b_k, PREC)
    dk += _dot(tl.where(causal_t, _operand(dC1T, DEFER) * GT, 0.0), b_q, PREC)
    if RES:
        dq += b_do
    return dG, dq, dk


@triton.jit
def _bwd_sums_zero(BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Zeroed accumulators of the backward's cross-tile sums (``_bwd_tile_sums``'s, then ``_bwd_tile_factors``' rows):
    SA, SAT, dC1, dC1T ([BT, BT]), dR ([BT, BV]), dq, dk ([BT, BK]), dbeta, df, dgam, dgL, dnL ([BT]), dbL, dfL, dmL
    (scalars)."""
    zero = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    return (tl.zeros([BT, BT], dtype=tl.float32), tl.zeros([BT, BT], dtype=tl.float32),
            tl.zeros([BT, BT], dtype=tl.float32), tl.zeros([BT, BT], dtype=tl.float32),
            tl.zeros([BT, BV], dtype=tl.float32), tl.zeros([BT, BK], dtype=tl.float32),
            tl.zeros([BT, BK], dtype=tl.float32), tl.zeros([BT], dtype=tl.float32), tl.zeros([BT], dtype=tl.float32),
            tl.zeros([BT], dtype=tl.float32), tl.zeros([BT], dtype=tl.float32), tl.zeros([BT], dtype=tl.float32),
            zero, zero, zero)


@triton.jit
def _bwd_tile_dy(kj, W1, W2, X, gdY, gam, ACT: tl.constexpr, DECAYED: tl.constexpr, PREC: tl.constexpr):
    """Backward of tile j, the dY terms (pass 3, gdY = gamma dY): dZ1 = X + (gdY W2_j^T) act'(Z1). Returns gamma dZ1
    (the tile's part of dk is gamma dZ1 W1_j^T), the tile's part of dgamma, and what it adds to the start-state
    gradient tiles (k^T gamma dZ1, A1^T gdY)."""
    Zk = _dot(kj, W1, PREC)
    Z1 = gam[:, None] * Zk
    A1 = _act(Z1, ACT)
    dZ1 = X + _dot(gdY, tl.trans(W2), PREC) * _act_d1(Z1, ACT)
    gdZ1 = gam[:, None] * dZ1
    dgam = tl.zeros([X.shape[0]], dtype=tl.float32)
    if DECAYED:
        dgam = tl.sum(dZ1 * Zk, axis=1)
    return gdZ1, dgam, _dot(tl.trans(kj), gdZ1, PREC), _dot(tl.trans(A1), gdY, PREC)


# ---------------------------------------------------------------------------------------------------------- forward


@triton.jit
def _start_rows(
    w1s, w2s, src1, src2, delta, b_k, b_v, gam, p_g, t_idx, t_ok, o_k, o_v, o_hh, k_ok, v_ok,
    H: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr, ACT: tl.constexpr,
    RES: tl.constexpr, PREC: tl.constexpr,
):
    """The prediction at the chunk-start state (W1, W2 at src1 / src2) and its bias rows, summed over hidden tiles:
    ``Y0 = act(gamma (k W1)) W2``, ``Y = gamma Y0 [+ k]``, ``R = dl/dy (Y; v)`` (0 on padded rows).
    Returns (Y0, the Huber deltas (1 unless BIAS == 3), R)."""
    NH: tl.constexpr = (HD + BH - 1) // BH
    Y0 = tl.zeros([BT, o_v.shape[0]], dtype=tl.float32)
    for j in range(NH):
        o_h = j * BH + o_hh
        h_ok = o_h < HD
        W1 = tl.load(w1s + src1 + o_k[:, None] * HD + o_h[None, :], mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        W2 = tl.load(w2s + src2 + o_h[:, None] * V + o_v[None, :], mask=h_ok[:, None] & v_ok[None, :], other=0.0)
        Y0 += _dot(_act(gam[:, None] * _dot(b_k, W1, PREC), ACT), W2, PREC)
    Y = gam[:, None] * Y0
    if RES:
        Y += b_k
    if BIAS == 3:
        b_d = tl.load(delta + p_g + t_idx * H, mask=t_ok, other=1.0).to(tl.float32)
    else:
        b_d = tl.zeros([BT], dtype=tl.float32)
    return Y0, b_d, tl.where(t_ok[:, None], bias_rows(Y, b_v, b_d, BIAS, P, SMOOTH, EPS), 0.0)


@triton.jit
def _fwd_chunk(
    q, k, v, eta, keep, mu, delta, o, w1s, w2s, s1s, s2s, rs, src1, src2, dst1, dst2, p_r,
    c, T, p_qk, p_v, p_g, o_t, o_k, o_v, o_hh, k_ok, v_ok,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
    BV: tl.constexpr, BH: tl.constexpr,
    BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr, ACT: tl.constexpr,
    RES: tl.constexpr, HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr,
    WANT_O: tl.constexpr, WANT_STATE: tl.constexpr,
):
    """One chunk of the forward from the state at src1/src2 (W1, W2; S at the same offsets of s1s/s2s): stores o
    (WANT_O) and the end state at dst1/dst2 (WANT_STATE); rs + p_r: a [BT, BV] fp32 scratch for R."""
    NH: tl.constexpr = (HD + BH - 1) // BH
    t0, t_end, t_idx, t_ok, L = chunk_rows(c, T, o_t, BT, CS)
    causal = o_t[:, None] >= o_t[None, :]
    eta_t, lb, beta, E, lm, m, NTm, G, f = gate_coeffs(
        eta + p_g, keep + p_g, mu + p_g, t0, t_end, H, o_t, BT, HAS_KEEP, MOMENTUM, PREC)
    if DECAYED:
        gam = beta
    else:
        gam = tl.full([BT], 1.0, dtype=tl.float32)
    qk_ok = t_ok[:, None] & k_ok[None, :]
    tv_ok = t_ok[:, None] & v_ok[None, :]
    b_k = tl.load(k + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_v + t_idx[:, None] * H * V + o_v[None, :], mask=tv_ok, other=0.0).to(tl.float32)

    # pass 1: the prediction at the chunk start and the bias rows
    Y0, b_d, R = _start_rows(w1s, w2s, src1, src2, delta, b_k, b_v, gam, p_g, t_idx, t_ok, o_k, o_v, o_hh, k_ok, v_ok,
                             H, V, HD, BT, BH, BIAS, P, SMOOTH, EPS, ACT, RES, PREC)

    C1 = tl.zeros([BT, BT], dtype=tl.float32)
    if WANT_O:
        b_q = tl.load(q + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0).to(tl.float32)
        C1 = tl.where(causal, G * _dot(b_q, tl.trans(b_k), PREC), 0.0)
        SA = tl.zeros([BT, BT], dtype=tl.float32)
        O = tl.zeros([BT, o_v.shape[0]], dtype=tl.float32)
    gL = _row_select(G, o_t, L)
    betaL = _vec_select(beta, o_t, L)
    nL, fL, mL = _row_select(NTm, o_t, L), _vec_select(f, o_t, L), _vec_select(m, o_t, L)  # (momentum only)

    tl.store(rs + p_r + o_t[:, None] * BV + o_v[None, :], R)
    tl.debug_barrier()  # pass 2 reloads R per hidden tile

    # pass 2: rank-one factors, the dual-form read and the end state, per hidden tile
    for j in range(NH):
        o_h = j * BH + o_hh
        h_ok = o_h < HD
        w1_off = o_k[:, None] * HD + o_h[None, :]
        w1_ok = k_ok[:, None] & h_ok[None, :]
        w2_off = o_h[:, None] * V + o_v[None, :]
        w2_ok = h_ok[:, None] & v_ok[None, :]
        # k, q, R reloaded per tile (L1/L2 hits): a loop-variant mask keeps the compiler from hoisting them, whose
        # shared-memory operand copies would then stay allocated through the whole loop (H100/H200 limit: 227 KB)
        live = o_t < BT + T + j  # always true; depends on j
        kj = tl.load(k + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok & live[:, None], other=0.0).to(tl.float32)
        Rj = tl.load(rs + p_r + o_t[:, None] * BV + o_v[None, :], mask=live[:, None], other=0.0)
        W1, W2, S1, S2 = _state_tiles(w1s, w2s, s1s, s2s, src1, src2, w1_off, w1_ok, w2_off, w2_ok, MOMENTUM)
        qj = kj  # (read only with outputs)
        if WANT_O:
            qj = tl.load(q + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok & live[:, None],
                         other=0.0).to(tl.float32)
        A1, Ah, _, W1n, W2n, S1n, S2n = _fwd_tile_math(qj, kj, Rj, W1, W2, S1, S2, gam, beta, f, C1, gL, nL,
                                                       betaL, fL, mL, ACT, MOMENTUM, PREC, WANT_O, False)
        if WANT_O:
            Oj, SAj = _fwd_tile_out(A1, Ah, W2, S2, beta, f, MOMENTUM, PREC)
            O += Oj
            SA += SAj
        if WANT_STATE:
            _store_state_tiles(w1s, w2s, s1s, s2s, dst1, dst2, w1_off, w1_ok, w2_off, w2_ok, W1n, W2n, S1n, S2n,
                               MOMENTUM)
    if WANT_O:
        R = tl.load(rs + p_r + o_t[:, None] * BV + o_v[None, :])  # afresh, as in pass 2
        O -= _dot(tl.where(causal, G * SA, 0.0), R, PREC)
        if RES:
            O += tl.load(q + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0).to(tl.float32)
        tl.store(o + p_v + t_idx[:, None] * H * V + o_v[None, :], O.to(o.dtype.element_ty), mask=tv_ok)


@triton.jit
def _walk_program(T, NS, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    """A walk program's batch*head i_bh, its ranges and masks, the offsets of its tokens' q / k rows (p_qk), v rows
    (p_v) and gates (p_g), and of its NS state slots (p_w1 in [B*H, NS, K, HD], p_w2 in [B*H, NS, HD, V])."""
    i_bh = tl.program_id(0)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_t, o_k, o_v, o_hh = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BH)
    p_g = i_b * T * H + i_h
    return (i_bh, o_t, o_k, o_v, o_hh, o_k < K, o_v < V, p_g * K, p_g * V, p_g, i_bh.to(tl.int64) * NS * K * HD,
            i_bh.to(tl.int64) * NS * HD * V)


@triton.jit
def _mlp_fwd_kernel(
    q, k, v, eta, keep, mu, delta, w1s, w2s, s1s, s2s, o, rs,
    T, NT, NS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr,
    BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
    BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr, ACT: tl.constexpr,
    RES: tl.constexpr, HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr,
    PREC: tl.constexpr, MODE: tl.constexpr,
):
    """State slots: w1s [B*H, NS, K, HD], w2s [B*H, NS, HD, V] (s1s, s2s alike), slot 0 = initial state. NS = NT + 1
    (every chunk-start state kept; chunk c reads slot c, writes c + 1) or 2 (ping-pong, no backward). rs [B*H, NT, BT, BV]
    fp32 scratch (R of each chunk)."""
    i_bh, o_t, o_k, o_v, o_hh, k_ok, v_ok, p_qk, p_v, p_g, p_w1, p_w2 = _walk_program(
        T, NS, H, K, V, HD, BT, BK, BV, BH)
    if MODE == 2:
        c = tl.program_id(1)
        _fwd_chunk(q, k, v, eta, keep, mu, delta, o, w1s, w2s, s1s, s2s, rs,
                   p_w1 + c * K * HD, p_w2 + c * HD * V, p_w1, p_w2, (i_bh.to(tl.int64) * NT + c) * BT * BV,
                   c, T, p_qk, p_v, p_g, o_t, o_k, o_v, o_hh, k_ok, v_ok,
                   H, K, V, HD, BT, CS, BV, BH, BIAS, P, SMOOTH, EPS, ACT, RES, HAS_KEEP, DECAYED, MOMENTUM, PREC,
                   True, False)
    else:
        for c in range(NT):
            s_in = c % NS
            s_out = (c + 1) % NS
            _fwd_chunk(q, k, v, eta, keep, mu, delta, o, w1s, w2s, s1s, s2s, rs,
                       p_w1 + s_in * K * HD, p_w2 + s_in * HD * V, p_w1 + s_out * K * HD, p_w2 + s_out * HD * V,
                       (i_bh.to(tl.int64) * NT + c) * BT * BV,
                       c, T, p_qk, p_v, p_g, o_t, o_k, o_v, o_hh, k_ok, v_ok,
                       H, K, V, HD, BT, CS, BV, BH, BIAS, P, SMOOTH, EPS, ACT, RES, HAS_KEEP, DECAYED, MOMENTUM,
                       PREC, MODE == 0, True)
            tl.debug_barrier()  # the next chunk reads the state tiles other threads just wrote


# --------------------------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_chunk(
    q, k, v, eta, keep, mu, delta, do, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, xs,
    dq, dk, dv, deta, dla, dlm, ddelta,
    src1, src2, e1, e2, st1, st2, p_x,
    c, T, p_qk, p_v, p_g, o_t, o_k, o_v, o_hh, k_ok, v_ok,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
    BV: tl.constexpr, BH: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
    ACT: tl.constexpr, RES: tl.constexpr, HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr,
    PREC: tl.constexpr,
):
    """One chunk of the backward: chunk-start state at src (w*s / s*s), end-state gradient at e (dw*s / ds*s); writes
    the start-state gradient at st and the chunk's dq, dk, dv and gate gradients."""
    NH: tl.constexpr = (HD + BH - 1) // BH
    t0, t_end, t_idx, t_ok, L = chunk_rows(c, T, o_t, BT, CS)
    at_L = o_t == L
    p_r = p_x + BT * HD  # xs + p_x: [BT, HD] dZ1 scratch, then [BT, BV] for R
    causal = o_t[:, None] >= o_t[None, :]
    causal_t = o_t[:, None] <= o_t[None, :]
    eta_t, lb, beta, E, lm, m, NTm, G, f = gate_coeffs(
        eta + p_g, keep + p_g, mu + p_g, t0, t_end, H, o_t, BT, HAS_KEEP, MOMENTUM, PREC)
    # G^T built directly (no tl.trans of [BT, BT] dot results: Hopper codegen hazard, fla #640)
    ET = tl.where(causal_t, tl.exp(tl.where(causal_t, lb[None, :] - lb[:, None], 0.0)), 0.0)
    if MOMENTUM:
        Nm = tl.where(causal_t, tl.exp(tl.where(causal_t, lm[None, :] - lm[:, None], 0.0)), 0.0) * eta_t[:, None]
        GT = _dot(Nm, ET, PREC)
    else:
        GT = ET * eta_t[:, None]
    if DECAYED:
        gam = beta
    else:
        gam = tl.full([BT], 1.0, dtype=tl.float32)
    qk_ok = t_ok[:, None] & k_ok[None, :]
    tv_ok = t_ok[:, None] & v_ok[None, :]
    b_q = tl.load(q + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_v + t_idx[:, None] * H * V + o_v[None, :], mask=tv_ok, other=0.0).to(tl.float32)
    b_do = tl.load(do + p_v + t_idx[:, None] * H * V + o_v[None, :], mask=tv_ok, other=0.0).to(tl.float32)
    C1 = tl.where(causal, G * _dot(b_q, tl.trans(b_k), PREC), 0.0)
    C1T = tl.where(causal_t, GT * _dot(b_k, tl.trans(b_q), PREC), 0.0)

    # pass 1: recompute the prediction at the chunk start and the bias rows
    Y0, b_d, R = _start_rows(w1s, w2s, src1, src2, delta, b_k, b_v, gam, p_g, t_idx, t_ok, o_k, o_v, o_hh, k_ok, v_ok,
                             H, V, HD, BT, BH, BIAS, P, SMOOTH, EPS, ACT, RES, PREC)
    gL = _row_select(G, o_t, L)
    betaL = _vec_select(beta, o_t, L)
    nL, fL, mL = _row_select(NTm, o_t, L), _vec_select(f, o_t, L), _vec_select(m, o_t, L)  # (momentum only)
    M2 = -tl.where(causal, G * _dot(b_do, tl.trans(R), PREC), 0.0)  # d(G . Ah A1^T) . G
    M2T = -tl.where(causal_t, GT * _dot(R, tl.trans(b_do), PREC), 0.0)

    tl.store(xs + p_r + o_t[:, None] * BV + o_v[None, :], R)
    tl.debug_barrier()  # pass 2 reloads R per hidden tile
    SA, SAT, dC1, dC1T, dR, b_dq, b_dk, dbeta, df, dgam, dgL, dnL, dbL, dfL, dmL = _bwd_sums_zero(
        BT, o_k.shape[0], o_v.shape[0])

    # pass 2: the read and every term that needs only R; the dY terms wait for pass 3
    for j in range(NH):
        o_h = j * BH + o_hh
        h_ok = o_h < HD
        w1_off = o_k[:, None] * HD + o_h[None, :]
        w1_ok = k_ok[:, None] & h_ok[None, :]
        w2_off = o_h[:, None] * V + o_v[None, :]
        w2_ok = h_ok[:, None] & v_ok[None, :]
        live = o_t < BT + T + j  # per-tile reloads as in the forward (always true; loop-variant: not hoisted)
        qj = tl.load(q + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok & live[:, None], other=0.0).to(tl.float32)
        kj = tl.load(k + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok & live[:, None], other=0.0).to(tl.float32)
        doj = tl.load(do + p_v + t_idx[:, None] * H * V + o_v[None, :], mask=tv_ok & live[:, None], other=0.0).to(tl.float32)
        Rj = tl.load(xs + p_r + o_t[:, None] * BV + o_v[None, :], mask=live[:, None], other=0.0)
        W1, W2, S1, S2 = _state_tiles(w1s, w2s, s1s, s2s, src1, src2, w1_off, w1_ok, w2_off, w2_ok, MOMENTUM)
        dW1e, dW2e, dS1e, dS2e = _state_tiles(dw1s, dw2s, ds1s, ds2s, e1, e2, w1_off, w1_ok, w2_off, w2_ok, MOMENTUM)
        (A1, Ah, D1, dH, dP, dbeta_j, df_j, dgam_j, dgL_j, dnL_j, dbL_j, dfL_j, dmL_j,
         X, dW1s, dW2s, dS1s, dS2s) = _bwd_tile_factors(qj, kj, doj, Rj, W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, gam,
                                                        beta, f, C1, C1T, M2, M2T, gL, nL, betaL, fL, mL,
                                                        ACT, DECAYED, MOMENTUM, PREC, False)
        SA_j, SAT_j, dC1_j, dC1T_j, dR_j, dq_j, dk_j = _bwd_tile_sums(A1, Ah, D1, dH, dP, W1, W2, S1, S2, dW1e, dW2e,
                                                                      dS1e, dS2e, beta, f, gL, nL, MOMENTUM, PREC)
        SA += SA_j
        SAT += SAT_j
        dC1 += dC1_j
        dC1T += dC1T_j
        dR += dR_j
        b_dq += dq_j
        b_dk += dk_j
        dbeta += dbeta_j
        df += df_j
        dgam += dgam_j
        dgL += dgL_j
        dnL += dnL_j
        dbL += dbL_j
        dfL += dfL_j
        dmL += dmL_j
        if MOMENTUM:
            tl.store(ds1s + st1 + w1_off, dS1s, mask=w1_ok)
            tl.store(ds2s + st2 + w2_off, dS2s, mask=w2_ok)
        # dZ1 without its dY part (pass 3 adds it)
        tl.store(xs + p_x + o_t[:, None] * HD + o_h[None, :], X, mask=h_ok[None, :])
        tl.store(dw1s + st1 + w1_off, dW1s, mask=w1_ok)
        tl.store(dw2s + st2 + w2_off, dW2s, mask=w2_ok)
    tl.debug_barrier()  # pass 3 reads the tiles just written by other threads
    # q, k, do, R loaded afresh (the copies from before pass 2 would keep their shared-memory operands live through it)
    p_tk = p_qk + t_idx[:, None] * H * K + o_k[None, :]
    b_q = tl.load(q + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
    b_do = tl.load(do + p_v + t_idx[:, None] * H * V + o_v[None, :], mask=tv_ok, other=0.0).to(tl.float32)
    R = tl.load(xs + p_r + o_t[:, None] * BV + o_v[None, :])
    b_v = tl.load(v + p_v + t_idx[:, None] * H * V + o_v[None, :], mask=tv_ok, other=0.0).to(tl.float32)
    # ([BT, BT] products recomputed in there rather than kept live through the hidden loop: register pressure)
    dY, dV, dd, dgam_y = _bwd_chunk_dy(SAT, dR, b_do, b_v, b_d, b_k, Y0, GT, gam, t_ok, o_t, o_t, BIAS, P, SMOOTH,
                                       EPS, RES, DECAYED, PREC, False)
    dG, b_dq, b_dk = _bwd_chunk_dg(SA, dC1, dC1T, b_dq, b_dk, b_q, b_k, b_do, R, G, GT, o_t, RES, PREC, False)
    if RES:
        b_dk += dY
    dgam += dgam_y
    gdY = gam[:, None] * dY

    # pass 3: the dY terms (through A1 = act(Z1) and Y = gamma A1 W2)
    for j in range(NH):
        o_h = j * BH + o_hh
        h_ok = o_h < HD
        w1_off = o_k[:, None] * HD + o_h[None, :]
        w1_ok = k_ok[:, None] & h_ok[None, :]
        w2_off = o_h[:, None] * V + o_v[None, :]
        w2_ok = h_ok[:, None] & v_ok[None, :]
        live = o_t < BT + T + j
        kj = tl.load(k + p_tk, mask=qk_ok & live[:, None], other=0.0).to(tl.float32)
        W1 = tl.load(w1s + src1 + w1_off, mask=w1_ok, other=0.0)
        W2 = tl.load(w2s + src2 + w2_off, mask=w2_ok, other=0.0)
        X = tl.load(xs + p_x + o_t[:, None] * HD + o_h[None, :], mask=h_ok[None, :], other=0.0)
        gdZ1, dgam_j, dW1_j, dW2_j = _bwd_tile_dy(kj, W1, W2, X, gdY, gam, ACT, DECAYED, PREC)
        b_dk += _dot(gdZ1, tl.trans(W1), PREC)
        dgam += dgam_j
        tl.store(dw1s + st1 + w1_off, tl.load(dw1s + st1 + w1_off, mask=w1_ok, other=0.0) + dW1_j, mask=w1_ok)
        tl.store(dw2s + st2 + w2_off, tl.load(dw2s + st2 + w2_off, mask=w2_ok, other=0.0) + dW2_j, mask=w2_ok)

    # gate gradients
    if DECAYED:
        dbeta += dgam
    dG += tl.where(at_L[:, None], dgL[None, :], 0.0)
    dbeta += tl.where(at_L, dbL, 0.0)
    if MOMENTUM:
        df += tl.where(at_L, dfL, 0.0)
    # the gate coefficients again (cheap) instead of keeping E live through the hidden loops
    eta_t, lb, beta, E, lm, m, NTm, G, f = gate_coeffs(
        eta + p_g, keep + p_g, mu + p_g, t0, t_end, H, o_t, BT, HAS_KEEP, MOMENTUM, PREC)
    ET, Nm, _ = gate_coeffs_t(eta_t, lb, lm, o_t, MOMENTUM, PREC)
    d_eta, dlb, dlm_ = gate_grads(dG, dbeta, df, dmL, dnL, eta_t, lb, beta, E, lm, m, ET, Nm, at_L, o_t,
                                  MOMENTUM, PREC)
    tl.store(dq + p_tk, b_dq, mask=qk_ok)
    tl.store(dk + p_tk, b_dk, mask=qk_ok)
    tl.store(dv + p_v + t_idx[:, None] * H * V + o_v[None, :], dV.to(dv.dtype.element_ty), mask=tv_ok)
    store_gate_grads(deta, dla, dlm, p_g + t_idx * H, t_ok, d_eta, dlb, dlm_, HAS_KEEP, MOMENTUM)
    if BIAS == 3:
        tl.store(ddelta + p_g + t_idx * H, dd, mask=t_ok)


@triton.jit
def _mlp_bwd_kernel(
    q, k, v, eta, keep, mu, delta, w1s, w2s, s1s, s2s, do, dw1s, dw2s, ds1s, ds2s, xs,
    dq, dk, dv, deta, dla, dlm, ddelta,
    T, NT, NS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr,
    BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
    BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr, ACT: tl.constexpr,
    RES: tl.constexpr, HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr,
):
    """Reverse walk of one batch*head. State slots as in the forward (NS = NT + 1); state-gradient slots dw1s
    [B*H, 2, K, HD], ... (ping-pong: chunk c reads slot (c + 1) % 2, writes slot c % 2; slot NT % 2 holds the final
    state's cotangent on entry, slot 0 the initial state's gradient on exit); xs [B*H, BT * (HD + BV)] fp32 scratch."""
    i_bh, o_t, o_k, o_v, o_hh, k_ok, v_ok, p_qk, p_v, p_g, p_w1, p_w2 = _walk_program(
        T, NS, H, K, V, HD, BT, BK, BV, BH)
    p_d1 = i_bh.to(tl.int64) * 2 * K * HD
    p_d2 = i_bh.to(tl.int64) * 2 * HD * V
    p_x = i_bh.to(tl.int64) * BT * (HD + BV)
    for cc in range(NT):
        c = NT - 1 - cc
        e = (c + 1) % 2
        s = c % 2
        _bwd_chunk(q, k, v, eta, keep, mu, delta, do, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, xs,
                   dq, dk, dv, deta, dla, dlm, ddelta,
                   p_w1 + c * K * HD, p_w2 + c * HD * V, p_d1 + e * K * HD, p_d2 + e * HD * V,
                   p_d1 + s * K * HD, p_d2 + s * HD * V, p_x,
                   c, T, p_qk, p_v, p_g, o_t, o_k, o_v, o_hh, k_ok, v_ok,
                   H, K, V, HD, BT, CS, BV, BH, BIAS, P, SMOOTH, EPS, ACT, RES, HAS_KEEP, DECAYED, MOMENTUM, PREC)
        tl.debug_barrier()  # the next (earlier) chunk reads the state gradient just written


# ------------------------------------------------------------------------------------------------ launch + autograd


def _block_h(hidden: int, chunk: int) -> int:
    """Hidden tile BH: ``MIRAS_KERNEL_BH`` (power of two >= 16), else 16 at chunk 64 and 32 below, at most the padded
    hidden width. Every [K, BH] / [BH, V] state tile is staged in shared memory once or twice per use; at chunk 64,
    D=128 with BH=32 the walk's momentum backward asks for 272 KB of the 227 KB an H100/H200 has, 176 KB with BH=16
    (sm_90 compile with triton 3.9, benchmarks/kernel_resources_mlp.py). The tiles layout's largest kernel asks for
    112 KB at BH=16 and 176 KB at BH=32 (tf32, 4 warps); which is faster there is unmeasured (gpu_all.sh A/Bs it)."""
    bh = env_tile("MIRAS_KERNEL_BH") or (16 if chunk >= 64 else 32)
    return min(bh, pow2_tile(hidden))


def tiles(hidden: int, chunk: int, momentum: bool, backward: bool) -> dict:
    """Tile constexprs of one kernel launch (the same rule for every kernel of a config, so tools can ask for it)."""
    return {"BH": _block_h(hidden, chunk)}


def _split() -> bool:
    """Walk layout: forward in two launches (state pass, then outputs; the default) or one (``MIRAS_KERNEL_SPLIT=0``)."""
    return env_switch("MIRAS_KERNEL_SPLIT", True)


LAYOUTS = ("tiles", "walk")


def layout() -> str:
    """``MIRAS_KERNEL_MLP_LAYOUT``: "tiles" (default; miras/kernels/mlp_tiles.py: the hidden dimension split across
    programs, a few launches per chunk) or "walk" (this module: one program per batch*head walks the chunks)."""
    return env_choice("MIRAS_KERNEL_MLP_LAYOUT", LAYOUTS, "tiles")


def _launch(kernel, grid, *args, config_env: str | None = None, **kw):
    """One launch, ``kernel[grid](*args, **kw)`` (``_launcher``)."""
    return _launcher(kernel, grid, config_env, **kw)(*args)


def _launcher(kernel, grid, config_env: str | None = None, **kw):
    """``kernel[grid]`` bound to its keyword arguments (constexprs), to be called with the positional ones, as often
    as a chunk loop needs (miras.kernels.launcher.BoundLaunch; plain ``kernel[grid]`` under the interpreter); on GPU
    with the config ``MIRAS_KERNEL_MLP_CONFIG=warps,stages[,maxnreg]`` (default 4 warps, 1 stage, or the kernel's
    ``TUNED_CONFIGS`` entry; the linear kernels' ``MIRAS_KERNEL_CONFIG`` does not apply here), or the kernel's own
    ``config_env`` where that is set
    (``MIRAS_KERNEL_MLP_SUMS_CONFIG``: the tiles layout's contractions over the hidden dim). One kernel's own
    ``MIRAS_KERNEL_MLP_CONFIG_<NAME>`` (``kernel_config_env``, e.g. ``MIRAS_KERNEL_MLP_CONFIG_BWD_SUMS=4,3``) comes
    before both: benchmarks/gpu_tune.sh times every kernel under a few configs and sets each its fastest.

    4 warps, not 8: on an H200 with triton 3.6, at 8 warps and chunk 64 (hidden tile 16) both layouts read shared
    memory out of bounds at a tl.dot (compute-sanitizer: invalid __shared__ read in ``_fwd_tile``; an illegal address,
    or NaN / wrong outputs as in the walk layout's gd case), while chunk 16 / 32 (hidden tile 32, smaller dots) ran
    right. At 4 warps the tiles layout matched the fp32 chunked path in every probed case (fp32 D=64 T=256 gd; bf16
    D=128 T=1024 H=8 momentum and gd: outputs and all gradients within 1e-2), and so did 8 warps with Triton's
    wgmma turned off (DISABLE_MMA_V3=1) in both bf16 cases: a Hopper wgmma code-generation problem with narrow tiles
    (RESULTS.md, session 8), of the kind reported in triton #10629 / #11366."""
    config = kernel_launch_config(kernel, config_env, kw.get("BT", 64))
    LAUNCH_CONFIGS.setdefault(kernel.__name__, set()).add(config_text(config))
    if "PDL" in kernel.arg_names:  # (the tiles layout's kernels: launch_pdl)
        kw = {**kw, "PDL": launch_pdl()}
        if kw["PDL"]:
            config = {**config, "launch_pdl": True}
    if interpreting():
        return partial(kernel[grid], **kw)
    if "BH" in kw:
        _warn_config(config["num_warps"], kw["BH"], _capability_major(torch.cuda.current_device()))
    return BoundLaunch(kernel, grid, {**config, **kw})


def kernel_config_env(name: str) -> str:
    """The environment variable of one MLP kernel's own launch config, by the kernel's name: ``_bwd_sums`` ->
    ``MIRAS_KERNEL_MLP_CONFIG_BWD_SUMS`` (``_launcher``)."""
    return "MIRAS_KERNEL_MLP_CONFIG_" + name.strip("_").upper()


LAUNCH_CONFIGS: dict[str, set[str]] = {}  # kernel name -> the configs it was bound at, "warps,stages[,maxnreg]"


def config_text(config: dict) -> str:
    """Launch options as their environment variables write them: "warps,stages[,maxnreg]"."""
    text = f"{config['num_warps']},{config['num_stages']}"
    return text + f",{config['maxnreg']}" if "maxnreg" in config else text


# the kernels whose default launch config is not 4 warps, 1 stage: each one's fastest in benchmarks/tune_mlp.py on an
# H100 (triton 3.6; B=4, T=4096, H=8, D=128, hidden 256, chunk 64, bf16, momentum; GPU session 15), device ms per
# fwd+bwd step at 4,1 -> here: _prep 0.876 -> 0.593 (8 warps take its spills away), _bwd_sums 2.095 -> 1.860,
# _bwd_end 0.289 -> 0.248, _fwd_out 0.398 -> 0.380 (their hidden-dim loops pipelined); all kernels 11.86 -> 11.32 ms.
# The tile kernels stay at 4 warps (8 miscompile on Hopper, ``_launcher``; they have no loop for stages to pipeline).
# (_prep's state part, timed as part of _prep then, is now a kernel of its own, _prep_state, kept at _prep's config.)
# _bwd_sums_read (session 19, untimed) runs _bwd_sums' loop on other blocks: it starts at _bwd_sums' config.
TUNED_CONFIGS = {"_prep": "8,2", "_prep_state": "8,2", "_bwd_sums": "4,2", "_bwd_sums_read": "4,2", "_bwd_end": "4,3",
                 "_fwd_out": "4,3"}
# the defaults of chunks below 64 (blocks of 16 or 32 rows) where they differ: left to itself, ptxas compiles
# _bwd_tile2 there to 32 registers and a 5.4 KB (16 rows) or 12 KB (32 rows) spill stack at D=128 (triton 3.6,
# sm_90); with an explicit cap of 255 it takes 255 registers and 1.35 KB or 4.4 KB (RESULTS.md, session 20; the same
# cap gives _fwd_tile and _bwd_tile32 more spills there, so only _bwd_tile2 has it). Unmeasured on a GPU.
SMALL_BLOCK_CONFIGS = {"_bwd_tile2": "4,1,255"}


def kernel_launch_config(kernel, config_env: str | None = None, rows: int = 64) -> dict:
    """A kernel's launch options on GPU, the first set of: its own ``kernel_config_env``, its group's ``config_env``,
    ``MIRAS_KERNEL_MLP_CONFIG``, its ``SMALL_BLOCK_CONFIGS`` entry when its blocks have fewer than 64 rows, its
    ``TUNED_CONFIGS`` entry, else 4 warps and 1 stage (``_launcher``)."""
    name = kernel.__name__
    default = (rows < 64 and SMALL_BLOCK_CONFIGS.get(name)) or TUNED_CONFIGS.get(name, "4,1")
    return (launch_config(kernel_config_env(name)) or (config_env and launch_config(config_env))
            or launch_config("MIRAS_KERNEL_MLP_CONFIG", default))


def launch_pdl() -> bool:
    """``MIRAS_KERNEL_MLP_PDL`` (default off; unmeasured): launch the tiles layout's kernels with programmatic
    dependent launch. Each kernel's programs may then be scheduled while the previous kernel in the stream drains,
    and wait for it (``common._pdl_start``, griddepcontrol.wait) before their first memory access, which hides the
    gap between two kernels of a chunk loop (~390 per fwd+bwd at T=4096), in CUDA graphs too. Only where it exists:
    a compiled kernel (not the interpreter), a Hopper or newer GPU, a Triton with grid dependency control."""
    if not env_switch("MIRAS_KERNEL_MLP_PDL", False) or interpreting() or not HAS_GDC or not torch.cuda.is_available():
        return False
    return _capability_major(torch.cuda.current_device()) >= 9


@cache
def _capability_major(device_index: int) -> int:
    """The compute capability's major number of a CUDA device (9: Hopper), asked once per device."""
    return torch.cuda.get_device_capability(device_index)[0]


@cache
def _warn_config(num_warps: int, hidden_tile: int, capability_major: int) -> None:
    """Warn once about a launch config known to go wrong: 8 or more warps with hidden tiles of 16 on Hopper read
    shared memory out of bounds on an H200 with triton 3.6 (``_launch``)."""
    if num_warps >= 8 and hidden_tile <= 16 and capability_major == 9:
        warnings.warn(f"MIRAS_KERNEL_MLP_CONFIG asks for {num_warps} warps with hidden tiles of {hidden_tile} on a "
                      "Hopper GPU: this read shared memory out of bounds on an H200 with triton 3.6 (illegal address "
                      "or wrong outputs, benchmarks/RESULTS.md session 8); the default is 4 warps", stacklevel=3)


PRECISIONS = ("tf32", "bf16")


def _prec(x: torch.Tensor) -> str:
    """Dot precision: exact fp32 in the interpreter, 3xTF32 for fp32 inputs on GPU, and for bf16/fp16 inputs
    ``MIRAS_KERNEL_MLP_PREC``: bf16 operands with fp32 accumulation (as the linear kernels use; the default of the
    tiles layout) or TF32 (the walk layout's default).

    bf16 in the tiles layout since GPU session 13 (benchmarks/RESULTS.md): on an H200 (triton 3.6) its kernels took
    11.5 ms per step against 15.0 ms with TF32 at the benchmark's shape, and all four bf16 GPU cases stayed within
    1.2e-2 of the fp32 chunked path (bound 2e-2). The walk layout's bf16 dots are unmeasured at 4 warps."""
    if interpreting():
        return "ieee"
    if x.dtype == torch.float32:
        return "tf32x3"
    return env_choice("MIRAS_KERNEL_MLP_PREC", PRECISIONS, "bf16" if layout() == "tiles" else "tf32")


def _consts(cfg: MLPConfig, q: torch.Tensor, v: torch.Tensor) -> dict:
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = chunk_block(cfg.chunk)
    return dict(H=H, K=K, V=V, HD=cfg.hidden, BT=BT, CS=cfg.chunk, BK=pow2_tile(K), BV=pow2_tile(V),
                BH=_block_h(cfg.hidden, BT), BIAS=cfg.bias, P=cfg.p, SMOOTH=cfg.smoothing, EPS=cfg.eps,
                ACT=cfg.act, RES=cfg.residual, HAS_KEEP=cfg.has_keep, DECAYED=cfg.decayed, MOMENTUM=cfg.momentum,
                PREC=_prec(q))


def _slots(x0: torch.Tensor | None, B: int, H: int, NS: int, shape: tuple[int, int], device) -> torch.Tensor:
    """[B*H, NS, *shape] fp32 slots with slot 0 = x0 (zeros when None)."""
    buf = torch.empty(B * H, NS, *shape, device=device, dtype=torch.float32)
    buf[:, 0] = 0.0 if x0 is None else x0.reshape(B * H, *shape)
    return buf


def _state_slots(cfg: MLPConfig, q, v, w1, w2, s1, s2, NS: int) -> tuple[torch.Tensor, ...]:
    """(w1s, w2s, s1s, s2s) state slots of both layouts ([B*H, NS, in, out] fp32, slot 0 = the initial state); without
    momentum s1s / s2s are w1s / w2s (never read)."""
    B, _, H, K = q.shape
    V, HD = v.shape[-1], cfg.hidden
    w1s = _slots(w1, B, H, NS, (K, HD), q.device)
    w2s = _slots(w2, B, H, NS, (HD, V), q.device)
    s1s = _slots(s1, B, H, NS, (K, HD), q.device) if cfg.momentum else w1s
    s2s = _slots(s2, B, H, NS, (HD, V), q.device) if cfg.momentum else w2s
    return w1s, w2s, s1s, s2s


def _final_state(cfg: MLPConfig, slots, last: int, q, v) -> dict[str, torch.Tensor]:
    """The final state {W1, W2 (, S1, S2)} [B, H, in, out] from slot ``last``."""
    B, _, H, K = q.shape
    V, HD = v.shape[-1], cfg.hidden
    names = ("W1", "W2", "S1", "S2") if cfg.momentum else ("W1", "W2")
    shapes = {"W1": (K, HD), "W2": (HD, V), "S1": (K, HD), "S2": (HD, V)}
    return {n: x[:, last].reshape(B, H, *shapes[n]).clone() for n, x in zip(names, slots)}


def _grad_slots(cfg: MLPConfig, q, v, dfinal: dict) -> tuple[torch.Tensor, ...]:
    """(dw1s, dw2s, ds1s, ds2s): the backward's state-gradient ping-pong slots [B*H, 2, in, out] fp32, the final state's
    cotangent (``dfinal``, zeros where None) in slot NT % 2."""
    B, T, H, K = q.shape
    V, HD = v.shape[-1], cfg.hidden
    NT = triton.cdiv(T, cfg.chunk)

    def slots(name: str, shape: tuple[int, int]) -> torch.Tensor:
        buf = torch.zeros(B * H, 2, *shape, device=q.device, dtype=torch.float32)
        if dfinal.get(name) is not None:
            buf[:, NT % 2] = dfinal[name].reshape(B * H, *shape)
        return buf

    dw1s, dw2s = slots("W1", (K, HD)), slots("W2", (HD, V))
    ds1s = slots("S1", (K, HD)) if cfg.momentum else dw1s
    ds2s = slots("S2", (HD, V)) if cfg.momentum else dw2s
    return dw1s, dw2s, ds1s, ds2s


def _input_grad_buffers(cfg: MLPConfig, q, v) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, deta, dla, dlm, ddelta) for the kernels to fill (dla / dlm / ddelta alias deta when absent)."""
    B, T, H, K = q.shape
    f32 = dict(device=q.device, dtype=torch.float32)
    deta = torch.empty(B, T, H, **f32)
    return (torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, K, **f32),
            torch.empty(B, T, H, v.shape[-1], device=q.device, dtype=v.dtype), deta,
            torch.empty(B, T, H, **f32) if cfg.has_keep else deta, torch.empty(B, T, H, **f32) if cfg.momentum else deta,
            torch.empty(B, T, H, **f32) if cfg.bias == 3 else deta)


def _input_grads(cfg: MLPConfig, q, k, keep, mu, bufs, grad_slots) -> tuple:
    """``mlp_scan_bwd``'s results from the filled buffers: (dq, dk, dv, deta, dkeep, dmu, ddelta, dW1_0, dW2_0, dS1_0,
    dS2_0); the kernels write d log(keep) / d log(mu), hence the division."""
    dq, dk, dv, deta, dla, dlm, ddelta = bufs
    starts = _final_state(cfg, grad_slots, 0, q, dv)
    return (dq.to(q.dtype), dk.to(k.dtype), dv, deta, dla / keep if cfg.has_keep else None,
            dlm / mu if cfg.momentum else None, ddelta if cfg.bias == 3 else None,
            starts["W1"], starts["W2"], starts.get("S1"), starts.get("S2"))


def mlp_scan_fwd(cfg: MLPConfig, q, k, v, eta, keep, mu, delta, w1, w2, s1, s2, keep_states: bool,
                 modes: tuple[int, ...] | None = None):
    """Forward: (o, final {W1, W2, S1, S2}, state slots (w1s, w2s, s1s, s2s) for the backward or None).

    modes: the kernel MODEs to launch (default: 1 then 2 when the states are kept and split, else 0); the warm-up
    script launches one at a time."""
    B, T, H, K = q.shape
    V, BT = v.shape[-1], chunk_block(cfg.chunk)
    NT = triton.cdiv(T, cfg.chunk)
    NS = NT + 1 if keep_states else 2
    w1s, w2s, s1s, s2s = _state_slots(cfg, q, v, w1, w2, s1, s2, NS)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    kw = _consts(cfg, q, v)
    rs = torch.empty(B * H, NT, BT, kw["BV"], device=q.device, dtype=torch.float32)
    args = (q, k, v, eta, keep if keep is not None else eta, mu if mu is not None else eta,
            delta if delta is not None else eta, w1s, w2s, s1s, s2s, o, rs, T, NT, NS)
    if modes is None:
        modes = (1, 2) if keep_states and _split() else (0,)
    for mode in modes:
        _launch(_mlp_fwd_kernel, (B * H, NT) if mode == 2 else (B * H,), *args, **kw, MODE=mode)
    slots = (w1s, w2s, s1s, s2s)
    return o, _final_state(cfg, slots, NT % NS, q, v), (slots if keep_states else None)


def mlp_scan_bwd(cfg: MLPConfig, q, k, v, eta, keep, mu, delta, slots, do, dfinal: dict):
    """Backward: gradients of (q, k, v, eta, keep, mu, delta, W1_0, W2_0, S1_0, S2_0) (None where absent)."""
    B, T, H, K = q.shape
    V, HD, BT = v.shape[-1], cfg.hidden, chunk_block(cfg.chunk)
    NT = triton.cdiv(T, cfg.chunk)
    w1s, w2s, s1s, s2s = slots
    dw1s, dw2s, ds1s, ds2s = grad = _grad_slots(cfg, q, v, dfinal)
    xs = torch.empty(B * H, BT * (HD + pow2_tile(V)), device=q.device, dtype=torch.float32)
    bufs = _input_grad_buffers(cfg, q, v)
    args = (q, k, v, eta, keep if keep is not None else eta, mu if mu is not None else eta,
            delta if delta is not None else eta, w1s, w2s, s1s, s2s, do, dw1s, dw2s, ds1s, ds2s, xs,
            *bufs, T, NT, w1s.shape[1])
    _launch(_mlp_bwd_kernel, (B * H,), *args, **_consts(cfg, q, v))
    return _input_grads(cfg, q, k, keep, mu, bufs, grad)


# the backward's launch sequence replayed as CUDA graphs: at most MIRAS_KERNEL_MLP_GRAPHS of them (default 0: off)
BACKWARD_GRAPHS = GraphCache("MIRAS_KERNEL_MLP_GRAPHS")
# the tiles layout's forward launches (two per chunk) likewise: MIRAS_KERNEL_MLP_FORWARD_GRAPHS, by default as
# MIRAS_KERNEL_MLP_GRAPHS (mlp_tiles.mlp_tiles_fwd)
FORWARD_GRAPHS = GraphCache("MIRAS_KERNEL_MLP_FORWARD_GRAPHS", default_env="MIRAS_KERNEL_MLP_GRAPHS")


class MLPScanFunction(torch.autograd.Function):
    """(q, k, v, eta, keep, mu, delta, W1_0, W2_0, S1_0, S2_0, w, b) -> (o, W1_T, W2_T, S1_T, S2_T), Triton both ways,
    in the kernel layout of ``layout()`` (both layouts keep the same state slots).

    Gates are fp32 [B, T, H]; keep / mu / delta and the states may be None; states are fp32 [B, H, in, out]. The
    momentum outputs are None without momentum. w, b: the LayerNorm head's weight and bias, fp32 [H, V] (``cfg.norm``,
    tiles layout only), else None.
    """

    @staticmethod
    def forward(ctx, cfg: MLPConfig, q, k, v, eta, keep, mu, delta, w1, w2, s1, s2, nw, nb):
        needs = any(ctx.needs_input_grad[1:])
        ctx.layout = layout()
        if ctx.layout == "tiles":
            from miras.kernels.mlp_tiles import mlp_tiles_fwd, r_dtype

            fwd = partial(mlp_tiles_fwd, head=(nw, nb))
            cfg = replace(cfg, r16=r_dtype(_prec(q)) == torch.bfloat16)  # (the backward reads the same records)
        else:
            fwd = mlp_scan_fwd
        o, final, slots = fwd(cfg, q, k, v, eta, keep, mu, delta, w1, w2, s1, s2, keep_states=needs)
        ctx.cfg = cfg
        if needs:
            ctx.save_for_backward(q, k, v, eta, keep, mu, delta, *slots)
        ctx.set_materialize_grads(False)
        return o, final["W1"], final["W2"], final.get("S1"), final.get("S2")

    @staticmethod
    def backward(ctx, do, dw1, dw2, ds1, ds2):
        q, k, v, eta, keep, mu, delta, *slots = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
        dfinal = {"W1": dw1, "W2": dw2, "S1": ds1, "S2": ds2}
        dfinal = {n: (None if g is None else g.contiguous().float()) for n, g in dfinal.items()}
        if ctx.layout == "tiles":
            from miras.kernels.mlp_tiles import mlp_tiles_bwd as bwd
        else:
            bwd = mlp_scan_bwd
        # (through a CUDA graph when MIRAS_KERNEL_MLP_GRAPHS > 0: miras/kernels/graphs.py)
        grads = BACKWARD_GRAPHS(bwd, ctx.layout, ctx.cfg, q, k, v, eta, keep, mu, delta, tuple(slots),
                                do.contiguous(), dfinal)
        if len(grads) == 11:  # (no head: no dw, db)
            grads = (*grads, None, None)
        return tuple(g if need else None for g, need in zip((None, *grads), ctx.needs_input_grad))


def mlp_memory_scan(spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                    keep: torch.Tensor | None, mu: torch.Tensor | None, delta: torch.Tensor | None,
                    state: dict[str, torch.Tensor | None],
                    head: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The 2-layer MLP memory scan (inputs already validated and laid out by ``miras.kernels.triton_memory_scan``).

    state: {"W1": [B, H, K, Hd], "W2": [B, H, Hd, V], "S1", "S2"} fp32 or None entries; head: the LayerNorm head's
    (weight, bias), fp32 [H, V], for a spec with ``memory.norm``. Returns (o, final state).
    """
    cfg = MLPConfig.from_spec(spec, q.shape[-1])
    nw, nb = head or (None, None)
    o, w1, w2, s1, s2 = MLPScanFunction.apply(cfg, q.contiguous(), k.contiguous(), v.contiguous(), eta, keep, mu,
                                              delta, state.get("W1"), state.get("W2"), state.get("S1"),
                                              state.get("S2"), nw, nb)
    final = {"W1": w1, "W2": w2}
    if cfg.momentum:
        final.update(S1=s1, S2=s2)
    return o, final
