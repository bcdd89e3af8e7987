"""Chunk-wise Triton kernels of the linear memory family (forward and backward) and their autograd Function.

Linear memory ``y = k W`` (W: [K, V] per head), gradient taken at the chunk-start state (Titans Eq. 16, Miras Eq. 28):

    P_t = W_0 (grad_at previous) or beta_t W_0 (grad_at decayed),   R_t = dl/dy (k_t P_t; v_t)   (bias row, common.py)
    W_t = beta_t W_0 + f_t S_0 - sum_{j<=t} G[t, j] k_j^T R_j        S_t = m_t S_0 - sum_{j<=t} N[j, t] k_j^T R_j
    o_t = q_t W_t = beta_t q_t W_0 + f_t q_t S_0 - sum_j G[t, j] (q_t . k_j) R_j                     (dual form)

Split kernels (the default, fla-style; ``MIRAS_KERNEL_SPLIT=0`` selects the fused walk):
  forward   1. state pass: one program per (V-tile, batch*head) walks the chunks in order with W (and the momentum S)
               on chip in fp32 and stores every chunk-start state ([B, H, NT, K, V], bf16 for bf16 inputs, else fp32:
               ``_state_dtype``; the backward reuses them);
            2. output pass: one program per (V-tile, batch*head, chunk) computes the chunk's outputs from its state.
  backward  0. pre-pass: one program per (V-tile, batch*head, chunk): the terms that do not need the state gradient;
            1. state pass: the chunks in reverse with dW (dS) on chip; stores every end-of-chunk state gradient (fp32);
            2. gradient pass, two kernels (``MIRAS_KERNEL_GRAD_SPLIT=0``: one, MODE 2): ``_grad_rows_kernel``, one
               program per (batch*head, chunk) with the whole K: dv, the gate gradients and what the second needs;
               ``_grad_qk_kernel``, one program per (K-block, batch*head, chunk): dq, dk.
Both passes of a direction run the same chunk body (``_fwd_chunk`` / ``_bwd_chunk``) with constexpr switches, and the
fused mode (MODE 0) runs it once per chunk inside the walk. In the one-kernel gradient pass and the fused walk, dq,
dk and the gate gradients are partial sums over V-tiles (reduced in PyTorch); dv and the state gradients are exact
per tile.

Ref: Behrouz et al. 2024, "Titans", arXiv:2501.00663 (Eq. 13-16); Behrouz et al. 2025, "It's All Connected"
(Miras), arXiv:2504.13173; dual form: Sun et al. 2024, arXiv:2407.04620.
"""

from __future__ import annotations

import os
import warnings
from functools import cache

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from miras.kernels.common import (
    HUBER_LN,
    RuleConfig,
    _dot,
    _row_select,
    _vec_select,
    bias_rows,
    bias_rows_bwd,
    bias_rows_bwd_sw,
    bias_rows_sw,
    chunk_block,
    chunk_rows,
    dot_prec,
    gate_coeffs,
    gate_coeffs_t,
    gate_grads,
    huber_deltas,
    huber_switch,
    interpreting,
    lag_carry,
    lag_carry_bwd,
    ln_rows,
    ln_rows_bwd,
    lq_scale,
    lq_scale_grad,
    pow2_tile,
    store_gate_grads,
    store_huber_ddelta,
)
from miras.kernels.linear_channel import channel_scan_bwd, channel_scan_fwd
from miras.kernels.settings import env_choice, env_switch, env_tile, launch_config


class LinearConfig(RuleConfig):
    """Static choices of one linear-memory kernel call (all become constexprs): the fields of RuleConfig."""

    @classmethod
    def from_spec(cls, spec) -> LinearConfig:
        """The kernel choices of a MemorySpec (linear memory; see miras.kernels.kernel_support)."""
        return cls(**cls.choices(spec))


# ---------------------------------------------------------------------------------------------------------- forward
# MODE (constexpr) of both directions: 0 fused (one program per (V-tile, b*h) walks the chunks and does everything),
# 1 state pass (the same walk, only the chunk-boundary states), 2 chunk-parallel (one program per (V-tile, b*h, chunk)
# reads its boundary states from the state pass and does the rest). Split = MODE 1 then MODE 2 (fla-style).


@triton.jit
def _coeff_kernel(eta, keep, mu, cf, T, BTH, H: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
                  HAS_KEEP: tl.constexpr, MOMENTUM: tl.constexpr):
    """Per-token gate coefficients of one chunk for the sequential state passes, one program per (b*h, chunk), so
    that those passes only load vectors instead of building the [BT, BT] coefficients at every step. Rows of cf
    ([5, B, T, H] fp32, row stride BTH = B*T*H; L = the chunk's last real token):
    0 beta_t,  1 g_L[t] = G[L, t],  2 f_t,  3 m_t,  4 n_L[t] = N[t, L]   (2-4 with momentum; common.gate_coeffs)."""
    i_bh, c = tl.program_id(0), tl.program_id(1)
    p_g = (i_bh // H).to(tl.int64) * T * H + (i_bh % H).to(tl.int64)
    o_t = tl.arange(0, BT)
    t0, t_end, _, t_ok, L = chunk_rows(c, T, o_t, BT, CS)
    eta_t, lb, beta, E, lm, m, NTm, G, f = gate_coeffs(
        eta + p_g, keep + p_g, mu + p_g, t0, t_end, H, o_t, BT, HAS_KEEP, MOMENTUM, "ieee")
    # g_L = E[L, :] N^T in fp32 FMAs (no tl.dot: G itself is not needed, and this small kernel stays off tensor cores)
    gL = tl.sum(_row_select(E, o_t, L)[:, None] * NTm, axis=0)
    p_t = cf + p_g + (t0 + o_t) * H
    tl.store(p_t, beta, mask=t_ok)
    tl.store(p_t + BTH, gL, mask=t_ok)
    if MOMENTUM:
        tl.store(p_t + 2 * BTH, f, mask=t_ok)
        tl.store(p_t + 3 * BTH, m, mask=t_ok)
        tl.store(p_t + 4 * BTH, _row_select(NTm, o_t, L), mask=t_ok)


@triton.jit
def _state_coeffs(cf, BTH, p_g, t_idx, t_ok, L_idx, H: tl.constexpr, MOMENTUM: tl.constexpr):
    """What a state-pass step needs, from ``_coeff_kernel``'s rows: the vectors beta, g_L, n_L over the chunk and the
    scalars beta_L, f_L, m_L at its last real token (global index L_idx). GD: n_L = 0, f_L = 0, m_L = 1 (unused)."""
    p_t = cf + p_g + t_idx * H
    p_L = cf + p_g + L_idx * H
    beta = tl.load(p_t, mask=t_ok, other=1.0)
    gL = tl.load(p_t + BTH, mask=t_ok, other=0.0)
    betaL = tl.load(p_L)
    if MOMENTUM:
        nL = tl.load(p_t + 4 * BTH, mask=t_ok, other=0.0)
        fL = tl.load(p_L + 2 * BTH)
        mL = tl.load(p_L + 3 * BTH)
    else:
        nL = tl.zeros_like(gL)
        fL = betaL * 0.0
        mL = betaL * 0.0 + 1.0
    return beta, gL, nL, betaL, fL, mL


@triton.jit
def _lag_gates(leta, lkeep, thr, p_g, t0, t_ok, o_t, H: tl.constexpr, LAG: tl.constexpr, NLAG: tl.constexpr):
    """A chunk's lag-token gates: the learning rates e [BT] of its first NLAG rows (0 on the others), the keep a0 of
    its first token, and elastic's threshold."""
    e = tl.load(leta + p_g + (t0 + o_t) * H, mask=t_ok & (o_t < NLAG), other=0.0)
    a0 = tl.load(lkeep + p_g + t0 * H)
    gam = 0.0 * a0
    if LAG == 1:
        gam = tl.load(thr + p_g % H)
    return e, a0, gam


@triton.jit
def _lag_grad(R, b_k, e, o_t, NLAG: tl.constexpr):
    """The lag token's gradient sum_{j < NLAG} e_j k_j^T r_j [BK, BV] from the chunk's first NLAG rows of k and R (the
    bias rows at the start state), in fp32. NLAG = 1 but for the omega bias' sub-tokens, where the lag token is the
    window of the chunk's first token (miras/kernels/omega.py)."""
    gk = _row_select(b_k, o_t, 0)[:, None] * (_vec_select(e, o_t, 0) * _row_select(R, o_t, 0))[None, :]
    for j in tl.static_range(1, NLAG):
        gk += _row_select(b_k, o_t, j)[:, None] * (_vec_select(e, o_t, j) * _row_select(R, o_t, j))[None, :]
    return gk


@triton.jit
def _lag_grad_bwd(dgk, R, b_k, e, o_t, NLAG: tl.constexpr):
    """The vector-Jacobian product of ``_lag_grad`` for dgk: (dR, dk) on the first NLAG rows, 0 on the others, and the
    gradient of e [BT]: dr_j = e_j k_j dgk, dk_j = e_j dgk r_j, de_j = k_j . (dgk r_j)."""
    dR = tl.zeros_like(R)
    dK = tl.zeros_like(b_k)
    de = tl.sum(dK, axis=1)
    for j in tl.static_range(NLAG):
        row = o_t == j
        k_j = _row_select(b_k, o_t, j)
        u = tl.sum(dgk * _row_select(R, o_t, j)[None, :], axis=1)  # dgk r_j [BK]
        e_j = _vec_select(e, o_t, j)
        dR += tl.where(row[:, None], e_j * tl.sum(k_j[:, None] * dgk, axis=0)[None, :], 0.0)
        dK += tl.where(row[:, None], e_j * u[None, :], 0.0)
        de += tl.where(row, tl.sum(k_j * u, axis=0), 0.0)
    return dR, dK, de


@triton.jit
def _lag_state(W, R, b_k, leta, lkeep, thr, p_g, t0, t_ok, o_t, k_ok, v_ok, H: tl.constexpr, LAG: tl.constexpr,
               SCALE: tl.constexpr, NLAG: tl.constexpr):
    """The chunk's carried state ``common.lag_carry`` from its start state W and its lag rows of R and k."""
    e, a0, gam = _lag_gates(leta, lkeep, thr, p_g, t0, t_ok, o_t, H, LAG, NLAG)
    return lag_carry(W, _lag_grad(R, b_k, e, o_t, NLAG), a0, gam, k_ok, v_ok, LAG, SCALE)


@triton.jit
def _fwd_chunk(
    q, k, kp, v, eta, keep, mu, delta, o, cf, W, S, s, c, T, BTH, p_qk, p_v, p_g, o_t, o_k, o_v, k_ok, v_ok,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
    BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
    HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr,
    WANT_O: tl.constexpr, WANT_STATE: tl.constexpr, USE_CF: tl.constexpr, KP: tl.constexpr, LQ: tl.constexpr,
    leta, lkeep, thr, LAG: tl.constexpr, SCALE: tl.constexpr, NLAG: tl.constexpr,
):
    """One chunk of the forward from its start state (W, S): stores o (WANT_O), returns the end state (WANT_STATE).
    USE_CF (the split state pass, no outputs): the gate coefficients from ``_coeff_kernel``'s rows in cf. KP: the
    predictions y = kp W use keys of their own (the exact delta rule's WY keys, miras/kernels/delta.py). LQ: they
    are taken at the read weights s W (Lq retention, ``common.lq_scale``; the reads stay q W, scaled outside).
    LAG (a lag-token retention; eta, keep are 0 and 1 on each chunk's first NLAG rows (its first token; the omega
    bias' sub-tokens: its window), whose own gates are in leta, lkeep, elastic's threshold per head in thr): the reads
    and the end state start from the carried state ``common.lag_carry`` of W, the predictions from W itself."""
    t0, t_end, t_idx, t_ok, L = chunk_rows(c, T, o_t, BT, CS)  # L: the row of the chunk's last real token
    if USE_CF:
        beta, gL, nL, betaL, fL, mL = _state_coeffs(cf, BTH, p_g, t_idx, t_ok, t0 + L, H, MOMENTUM)
    else:
        eta_t, lb, beta, E, lm, m, NTm, G, f = gate_coeffs(
            eta + p_g, keep + p_g, mu + p_g, t0, t_end, H, o_t, BT, HAS_KEEP, MOMENTUM, PREC)
        gL = _row_select(G, o_t, L)
        nL = _row_select(NTm, o_t, L)
        betaL = _vec_select(beta, o_t, L)
        fL = _vec_select(f, o_t, L)
        mL = _vec_select(m, o_t, L)
    qk_ok = t_ok[:, None] & k_ok[None, :]
    tv_ok = t_ok[:, None] & v_ok[None, :]
    b_k = tl.load(k + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_v + t_idx[:, None] * H * V + o_v[None, :], mask=tv_ok, other=0.0).to(tl.float32)
    b_kp = b_k
    if KP:
        b_kp = tl.load(kp + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0)  # (dots only)
    if LQ:
        b_kp = b_kp * s

    b_y = _dot(b_kp, W, PREC)  # [BT, BV] prediction at the chunk start
    if DECAYED:
        b_y = b_y * beta[:, None]
    b_d = huber_deltas(delta, p_g, t_idx, t_ok, BT, H, V, BIAS)
    if BIAS >= 4:  # behind a LayerNorm head (common.LN_HEAD): the head's weight row in delta's place, all of V
        R = ln_rows(b_y, b_v, tl.load(delta + (p_g % H) * V + o_v, mask=v_ok, other=0.0), b_d, v_ok, V, BIAS - 4,
                    P, SMOOTH, EPS)
    else:
        R = bias_rows(b_y, b_v, b_d, BIAS, P, SMOOTH, EPS)
    R = tl.where(t_ok[:, None], R, 0.0)
    Wc = W  # the state the chunk carries (reads, end state)
    if LAG:
        Wc = _lag_state(W, R, b_k, leta, lkeep, thr, p_g, t0, t_ok, o_t, k_ok, v_ok, H, LAG, SCALE, NLAG)

    if WANT_O:
        causal = o_t[:, None] >= o_t[None, :]
        b_q = tl.load(q + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0).to(tl.float32)
        A = _dot(b_q, tl.trans(b_k), PREC)  # [BT, BT] q_t . k_j
        AG = tl.where(causal, A * G, 0.0)
        b_o = beta[:, None] * _dot(b_q, Wc, PREC) - _dot(AG, R, PREC)
        if MOMENTUM:
            b_o += f[:, None] * _dot(b_q, S, PREC)
        tl.store(o + p_v + t_idx[:, None] * H * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=tv_ok)

    if WANT_STATE:  # end-of-chunk state: W_L = beta_L W + f_L S - K^T (g_L R),  S_L = m_L S - K^T (n_L R)
        W_new = betaL * Wc - _dot(tl.trans(b_k * gL[:, None]), R, PREC)
        if MOMENTUM:
            W_new += fL * S
            S = mL * S - _dot(tl.trans(b_k * nL[:, None]), R, PREC)
        W = W_new
    return W, S


@triton.jit
def _linear_fwd_kernel(
    q, k, kp, v, eta, keep, mu, delta, h0, s0, o, hs, ss, ht, st, cf, sc, leta, lkeep, thr,
    T, NT, BTH,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
    HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_S0: tl.constexpr, PREC: tl.constexpr, MODE: tl.constexpr, CF: tl.constexpr,
    KP: tl.constexpr, LQ: tl.constexpr = False, Q: tl.constexpr = 2.0, QEPS: tl.constexpr = 1e-6,
    LAG: tl.constexpr = 0, SCALE: tl.constexpr = 1.0, NLAG: tl.constexpr = 1,
):
    """LQ (Lq retention): the walks (all of V per program) take each chunk's read scale s = 1 / nu(W) at its start
    (``common.lq_scale``) and store it in sc [B*H, NT]; the chunk-parallel pass reads it there. LAG (a lag-token
    retention, ``_fwd_chunk``): every pass forms each chunk's carried state from its start state in hs."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    k_ok, v_ok = o_k < K, o_v < V
    p_qk = (i_b * T * H + i_h) * K  # token t of (b, h) at p_qk + t * H * K
    p_v = (i_b * T * H + i_h) * V
    p_g = i_b * T * H + i_h
    p_s = i_bh.to(tl.int64) * K * V
    s_off = o_k[:, None] * V + o_v[None, :]
    s_ok = k_ok[:, None] & v_ok[None, :]

    if MODE == 2:  # one chunk, start state from the state pass
        c = tl.program_id(2)
        p_c = p_s * NT + c.to(tl.int64) * K * V  # chunk-start state slot [B, H, NT, K, V]
        W = tl.load(hs + p_c + s_off, mask=s_ok, other=0.0).to(tl.float32)
        S = tl.zeros([BK, BV], dtype=tl.float32)
        if MOMENTUM:
            S = tl.load(ss + p_c + s_off, mask=s_ok, other=0.0).to(tl.float32)
        s = 1.0
        if LQ:
            s = tl.load(sc + i_bh * NT + c)
        _fwd_chunk(q, k, kp, v, eta, keep, mu, delta, o, cf, W, S, s, c, T, BTH, p_qk, p_v, p_g, o_t, o_k, o_v,
                   k_ok, v_ok, H, K, V, BT, CS, BIAS, P, SMOOTH, EPS, HAS_KEEP, DECAYED, MOMENTUM, PREC, True, False,
                   False, KP, LQ, leta, lkeep, thr, LAG, SCALE, NLAG)
    else:
        W = tl.zeros([BK, BV], dtype=tl.float32)
        S = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_H0:
            W = tl.load(h0 + p_s + s_off, mask=s_ok, other=0.0).to(tl.float32)
        if HAS_S0:
            S = tl.load(s0 + p_s + s_off, mask=s_ok, other=0.0).to(tl.float32)
        for c in range(NT):
            p_c = p_s * NT + c * K * V
            tl.store(hs + p_c + s_off, W.to(hs.dtype.element_ty), mask=s_ok)
            if MOMENTUM:
                tl.store(ss + p_c + s_off, S.to(ss.dtype.element_ty), mask=s_ok)
            s = 1.0
            if LQ:  # (the whole [K, V] state in this program)
                s, _ = lq_scale(W, Q, QEPS)
                tl.store(sc + i_bh * NT + c, s)
            W, S = _fwd_chunk(q, k, kp, v, eta, keep, mu, delta, o, cf, W, S, s, c, T, BTH, p_qk, p_v, p_g, o_t,
                              o_k, o_v, k_ok, v_ok, H, K, V, BT, CS, BIAS, P, SMOOTH, EPS, HAS_KEEP, DECAYED,
                              MOMENTUM, PREC, MODE == 0, True, MODE == 1 and CF, KP, LQ, leta, lkeep, thr, LAG,
                              SCALE, NLAG)
        tl.store(ht + p_s + s_off, W, mask=s_ok)
        if MOMENTUM:
            tl.store(st + p_s + s_off, S, mask=s_ok)


# --------------------------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_pre_chunk(
    q, k, eta, keep, mu, do, xd, up, ufp, c, T, p_qk, p_v, p_g, p_c, s_off, s_ok, o_t, o_k, o_v, k_ok, v_ok,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
    HAS_KEEP: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr,
):
    """The terms of the backward state pass that do not depend on the state gradient, for one chunk (parallel):
    Xd = -(A^T . G^T) dO (the output rows' part of dR), U = Q^T (beta dO), U_f = Q^T (f dO) (momentum)."""
    t0, t_end, t_idx, t_ok, _ = chunk_rows(c, T, o_t, BT, CS)
    eta_t, lb, beta, E, lm, m, NTm, G, f = gate_coeffs(
        eta + p_g, keep + p_g, mu + p_g, t0, t_end, H, o_t, BT, HAS_KEEP, MOMENTUM, PREC)
    ET, Nm, GT = gate_coeffs_t(eta_t, lb, lm, o_t, MOMENTUM, PREC)
    qk_ok = t_ok[:, None] & k_ok[None, :]
    tv_ok = t_ok[:, None] & v_ok[None, :]
    b_q = tl.load(q + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0).to(tl.float32)
    b_do = tl.load(do + p_v + t_idx[:, None] * H * V + o_v[None, :], mask=tv_ok, other=0.0).to(tl.float32)
    AT = _dot(b_k, tl.trans(b_q), PREC)
    tl.store(xd + p_v + t_idx[:, None] * H * V + o_v[None, :], -_dot(AT * GT, b_do, PREC), mask=tv_ok)
    tl.store(up + p_c + s_off, _dot(tl.trans(b_q), beta[:, None] * b_do, PREC), mask=s_ok)
    if MOMENTUM:
        tl.store(ufp + p_c + s_off, _dot(tl.trans(b_q), f[:, None] * b_do, PREC), mask=s_ok)


@triton.jit
def _bwd_setup(q, k, eta, keep, mu, c, T, p_qk, p_g, o_t, o_k, k_ok,
               H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
               HAS_KEEP: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """What the backward of chunk c needs whatever V-range it works on: gate coefficients (and transposes), the last
    real token L with its coefficient rows g_L = G[L, :] and n_L = N[:, L], and the chunk's q, k in fp32."""
    t0, t_end, t_idx, t_ok, L = chunk_rows(c, T, o_t, BT, CS)
    eta_t, lb, beta, E, lm, m, NTm, G, f = gate_coeffs(
        eta + p_g, keep + p_g, mu + p_g, t0, t_end, H, o_t, BT, HAS_KEEP, MOMENTUM, PREC)
    ET, Nm, GT = gate_coeffs_t(eta_t, lb, lm, o_t, MOMENTUM, PREC)
    qk_ok = t_ok[:, None] & k_ok[None, :]
    b_q = tl.load(q + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0).to(tl.float32)
    gL = _row_select(G, o_t, L)
    nL = _row_select(NTm, o_t, L)
    return t_idx, t_ok, L, eta_t, lb, beta, E, lm, m, NTm, G, f, ET, Nm, GT, gL, nL, b_q, b_k


@triton.jit
def _bwd_rows(b_q, b_k, b_kp, b_v, b_do, b_d, b_w, Xd, W, S, dW, dS, beta, f, gL, nL, t_ok, at_L, o_t, v_ok,
              V: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
              DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr, KP: tl.constexpr,
              e, a0, gam, U, betaL, k_ok, LAG: tl.constexpr, SCALE: tl.constexpr, NLAG: tl.constexpr):
    """The backward of one chunk restricted to one V-range (columns of W, S, dW, dS, v, do and Xd).

    o = beta*(qW) + f*(qS) - (G.A) R ;  W_end = beta_L W + f_L S - K^T (g_L R) ;  S_end = m_L S - K^T (n_L R), with
    R = dl/dy (y = kW [beta]) and Xd = -(A^T.G^T) dO the output rows' part of dR. Returns dV and dY (dYk = dY at the
    undecayed prediction) of the range, and its contributions to sums over V that ``_bwd_grads`` finishes: all of them
    are linear in these, so V-ranges (sub-blocks of one program or V-tiles of several) simply add up. KP: the
    predictions y = kp W use keys of their own (b_kp); their gradient dYk W^T comes back apart as b_dkp, and b_dk
    keeps the write and read roles of k alone. BIAS >= 4 (a LayerNorm head, all of V): b_w is the head's weight row,
    and the rows of its gradient come back as dWl (else dWl is a placeholder).

    LAG (a lag-token retention; e, a0, gam = the chunk's ``_lag_gates``, U its reads' term Q^T (beta dO), betaL its
    end state's carry coefficient): the reads and the end state start from Wc = ``common.lag_carry`` of W, whose
    gradient betaL dW + U goes back through it (``common.lag_carry_bwd``, ``_lag_grad_bwd``): into the lag rows of
    dR (their bias rows) and of dk, and as (dW through Wc, de [BT], da0, dgam), returned last (zeros without LAG).
    """
    causal = o_t[:, None] >= o_t[None, :]
    causal_t = o_t[:, None] <= o_t[None, :]
    b_yk = _dot(b_kp, W, PREC)  # recompute the chunk's predictions at its start state
    b_y = b_yk
    if DECAYED:
        b_y = b_yk * beta[:, None]
    if BIAS >= 4:
        R = tl.where(t_ok[:, None], ln_rows(b_y, b_v, b_w, b_d, v_ok, V, BIAS - 4, P, SMOOTH, EPS), 0.0)
    else:
        R = tl.where(t_ok[:, None], bias_rows(b_y, b_v, b_d, BIAS, P, SMOOTH, EPS), 0.0)
    KdW = _dot(b_k, dW, PREC)  # [BT, BV] rows k_j dW_end
    dR = Xd - gL[:, None] * KdW
    if MOMENTUM:
        KdS = _dot(b_k, dS, PREC)
        dR -= nL[:, None] * KdS
    Wc = W  # the carried state (reads, end state)
    dW_lag = W
    dK_lag = b_k
    de = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    da0 = tl.sum(de, axis=0)
    dgam = da0
    if LAG:
        gk = _lag_grad(R, b_k, e, o_t, NLAG)
        Wc = lag_carry(W, gk, a0, gam, k_ok, v_ok, LAG, SCALE)
        dW_lag, dz, da0, dgam = lag_carry_bwd(W, Wc, gk, a0, gam, betaL * dW + U, LAG, SCALE)
        dR_lag, dK_lag, de = _lag_grad_bwd(-dz, R, b_k, e, o_t, NLAG)
        dR += dR_lag
    dR = tl.where(t_ok[:, None], dR, 0.0)
    if BIAS >= 4:
        dY, dV, dWl, dd = ln_rows_bwd(b_y, b_v, b_w, b_d, dR, v_ok, V, BIAS - 4, P, SMOOTH, EPS)
    else:
        dY, dV, dd = bias_rows_bwd(b_y, b_v, b_d, dR, BIAS, P, SMOOTH, EPS)
        dWl = dV
    dYk = dY
    if DECAYED:
        dYk = dY * beta[:, None]

    dAG = -tl.where(causal, _dot(b_do, tl.trans(R), PREC), 0.0)     # d(A.G)[t, j]
    dAGT = -tl.where(causal_t, _dot(R, tl.trans(b_do), PREC), 0.0)  # its transpose, built directly (no tl.trans)
    dgL = -tl.sum(KdW * R, axis=1)
    b_dq = beta[:, None] * _dot(b_do, tl.trans(Wc), PREC)
    b_dkp = _dot(dYk, tl.trans(W), PREC)  # through the predictions
    if KP:
        b_dk = -_dot(gL[:, None] * R, tl.trans(dW), PREC)
    else:
        b_dk = b_dkp - _dot(gL[:, None] * R, tl.trans(dW), PREC)
    dbeta = tl.sum(b_do * _dot(b_q, Wc, PREC), axis=1)
    if DECAYED:
        dbeta += tl.sum(dY * b_yk, axis=1)
    dbeta += tl.where(at_L, tl.sum(tl.sum(dW * Wc, axis=1), axis=0), 0.0)
    dnL = tl.zeros_like(dgL)
    df = tl.zeros_like(dgL)
    dmL = tl.sum(tl.zeros_like(dgL), axis=0)
    if MOMENTUM:
        dnL = -tl.sum(KdS * R, axis=1)
        b_dq += f[:, None] * _dot(b_do, tl.trans(S), PREC)
        b_dk -= _dot(nL[:, None] * R, tl.trans(dS), PREC)
        df = tl.sum(b_do * _dot(b_q, S, PREC), axis=1)
        df += tl.where(at_L, tl.sum(tl.sum(dW * S, axis=1), axis=0), 0.0)
        dmL = tl.sum(tl.sum(dS * S, axis=1), axis=0)
    if LAG:
        b_dk += dK_lag
    return dV, dd, dYk, b_dq, b_dk, dAG, dAGT, dgL, dbeta, dnL, df, dmL, b_dkp, dWl, dW_lag, de, da0, dgam


@triton.jit
def _bwd_grads(dq, dk, deta, dla, dlm, b_q, b_k, b_dq, b_dk, dAG, dAGT, dgL, dbeta, dnL, df, dmL,
               eta_t, lb, beta, E, lm, m, G, ET, Nm, GT, at_L, t_idx, t_ok, qk_ok, p_tk, p_gate, o_t,
               H: tl.constexpr, HAS_KEEP: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Finish the chunk's input gradients from the sums of ``_bwd_rows``: dq += (dAG . G) k, dk += (dAG . G)^T q,
    store them, and the gate gradients (``_gate_grads``)."""
    A = _dot(b_q, tl.trans(b_k), PREC)  # A[t, j] = q_t . k_j
    b_dq += _dot(dAG * G, b_k, PREC)
    b_dk += _dot(dAGT * GT, b_q, PREC)
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=qk_ok)
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=qk_ok)
    _gate_grads(deta, dla, dlm, A, dAG, dgL, dbeta, dnL, df, dmL, eta_t, lb, beta, E, lm, m, ET, Nm, at_L,
                t_idx, t_ok, p_gate, o_t, H, HAS_KEEP, MOMENTUM, PREC)


@triton.jit
def _gate_grads(deta, dla, dlm, A, dAG, dgL, dbeta, dnL, df, dmL, eta_t, lb, beta, E, lm, m, ET, Nm, at_L,
                t_idx, t_ok, p_gate, o_t, H: tl.constexpr, HAS_KEEP: tl.constexpr, MOMENTUM: tl.constexpr,
                PREC: tl.constexpr):
    """Store the gate gradients of a chunk from the sums of the backward: dAG (d(A.G)), the rows of the end states
    (dgL, dnL, dmL) and dbeta, df. G = E N^T carries the gates, so dG = dAG.A (+ the W_end row); the rest is
    ``common.gate_grads``."""
    dG = dAG * A + tl.where(at_L[:, None], dgL[None, :], 0.0)
    d_eta, dlb, dlm_ = gate_grads(dG, dbeta, df, dmL, dnL, eta_t, lb, beta, E, lm, m, ET, Nm, at_L,
                                  o_t, MOMENTUM, PREC)
    store_gate_grads(deta, dla, dlm, p_gate + t_idx * H, t_ok, d_eta, dlb, dlm_, HAS_KEEP, MOMENTUM)


@triton.jit
def _bwd_chunk(
    q, k, kp, v, eta, keep, mu, delta, do, dq, dk, dkp, dv, deta, dla, dlm, ddelta, xd, cf,
    W, S, dW, dS, U, Uf, ds_in, c, T, BTH, p_qk, p_v, p_g, p_part, o_t, o_k, o_v, k_ok, v_ok,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
    BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
    HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr,
    WANT_GRADS: tl.constexpr, USE_PRE: tl.constexpr, USE_CF: tl.constexpr, KP: tl.constexpr,
    LQ: tl.constexpr, Q: tl.constexpr, QEPS: tl.constexpr,
    leta, lkeep, thr, dlag, LAG: tl.constexpr, SCALE: tl.constexpr, NLAG: tl.constexpr,
):
    """One chunk of the backward with the states on chip. (W, S): its start state; (dW, dS): the gradient of its
    end state. Returns the gradient of the start state; with WANT_GRADS (the fused walk, and the gradient pass on a
    whole V-tile) it also stores dq, dk, dv and the gate partial sums. USE_PRE (the split state pass, no input
    gradients): Xd from ``xd``, U and Uf from the pre-pass (``_bwd_pre_chunk``) instead of computing them; USE_CF
    (only with USE_PRE) the gate coefficients from ``_coeff_kernel``'s rows in cf. KP: the predictions' own keys
    (``_bwd_rows``), whose gradient goes to dkp. LQ (Lq retention, a walk over all of V; kp = s k): the start state's
    gradient also takes the path through the chunk's read scale s = 1 / nu(W), whose gradient is ds_in (the reads')
    plus sum dYk . (k W) (the predictions'). LAG (a lag-token retention, ``_bwd_rows``): the start state's gradient
    goes through the chunk's carried state; with WANT_GRADS the lag rows' de and the first token's da0, dgam go to
    the partial-sum slots of dlag [NP, 3, B, T, H] (the other tokens' stay 0)."""
    if USE_CF:
        t0, _, t_idx, t_ok, L = chunk_rows(c, T, o_t, BT, CS)
        beta, gL, nL, betaL, fL, mL = _state_coeffs(cf, BTH, p_g, t_idx, t_ok, t0 + L, H, MOMENTUM)
        f = tl.zeros_like(beta)  # f, q and dO only feed the input gradients, which this pass does not take
        b_k = tl.load(k + p_qk + t_idx[:, None] * H * K + o_k[None, :],
                      mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        b_q = b_k
    else:
        t_idx, t_ok, L, eta_t, lb, beta, E, lm, m, NTm, G, f, ET, Nm, GT, gL, nL, b_q, b_k = _bwd_setup(
            q, k, eta, keep, mu, c, T, p_qk, p_g, o_t, o_k, k_ok, H, K, BT, CS, HAS_KEEP, MOMENTUM, PREC)
        betaL = _vec_select(beta, o_t, L)
        fL = _vec_select(f, o_t, L)
        mL = _vec_select(m, o_t, L)
    at_L = o_t == L
    qk_ok = t_ok[:, None] & k_ok[None, :]
    tv_ok = t_ok[:, None] & v_ok[None, :]
    b_kp = b_k
    if KP:
        b_kp = tl.load(kp + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0)  # (dots only)
    p_tv = p_v + t_idx[:, None] * H * V + o_v[None, :]
    b_v = tl.load(v + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
    b_d = huber_deltas(delta, p_g, t_idx, t_ok, BT, H, V, BIAS)
    b_w = tl.zeros([1], dtype=tl.float32)
    if BIAS >= 4:  # the LayerNorm head's weight row (all of V)
        b_w = tl.load(delta + (p_g % H) * V + o_v, mask=v_ok, other=0.0)
    if USE_PRE:  # the state pass: dO enters only through Xd and U (pre-pass); b_do feeds nothing it keeps
        b_do = b_v
        Xd = tl.load(xd + p_tv, mask=tv_ok, other=0.0)
    else:
        b_do = tl.load(do + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
        Xd = -_dot(_dot(b_k, tl.trans(b_q), PREC) * GT, b_do, PREC)  # AT[j, t] = q_t . k_j
    # (the lag-token retentions are defined with plain GD: with momentum, U_f below would be left unset)
    tl.static_assert(LAG == 0 or not MOMENTUM, "a lag-token retention (LAG) runs with the gd learner only")
    e, a0, gam = beta, 1.0, 0.0
    if LAG:
        e, a0, gam = _lag_gates(leta, lkeep, thr, p_g, c * CS, t_ok, o_t, H, LAG, NLAG)
        if not USE_PRE:  # (the carried state's gradient needs the reads' term first)
            U = _dot(tl.trans(b_q), beta[:, None] * b_do, PREC)
    dV, dd, dYk, b_dq, b_dk, dAG, dAGT, dgL, dbeta, dnL, df, dmL, b_dkp, dWl, dW_lag, de, da0, dgam = _bwd_rows(
        b_q, b_k, b_kp, b_v, b_do, b_d, b_w, Xd, W, S, dW, dS, beta, f, gL, nL, t_ok, at_L, o_t, v_ok,
        V, BIAS, P, SMOOTH, EPS, DECAYED, MOMENTUM, PREC, KP, e, a0, gam, U, betaL, k_ok, LAG, SCALE, NLAG)
    if WANT_GRADS:
        p_tk = p_part * K + p_qk + t_idx[:, None] * H * K + o_k[None, :]
        _bwd_grads(dq, dk, deta, dla, dlm, b_q, b_k, b_dq, b_dk, dAG, dAGT, dgL, dbeta, dnL, df, dmL,
                   eta_t, lb, beta, E, lm, m, G, ET, Nm, GT, at_L, t_idx, t_ok, qk_ok, p_tk, p_part + p_g, o_t,
                   H, HAS_KEEP, MOMENTUM, PREC)
        if KP:
            tl.store(dkp + p_tk, b_dkp.to(dkp.dtype.element_ty), mask=qk_ok)
        tl.store(dv + p_tv, dV.to(dv.dtype.element_ty), mask=tv_ok)
        if BIAS >= 4:  # the rows of the head weight's gradient, [B, T, H, V] (one V-tile)
            tl.store(ddelta + p_tv, dWl, mask=tv_ok)
        store_huber_ddelta(ddelta, dd, p_part, p_g, t_idx, t_ok, BTH, H, V, BIAS)
        if LAG:  # (at the lag rows' tokens; the slots of the other tokens stay 0)
            p_lag = dlag + 3 * p_part + p_g
            tl.store(p_lag + t_idx * H, de, mask=t_ok & (o_t < NLAG))
            tl.store(p_lag + BTH + c * CS * H, da0)
            tl.store(p_lag + 2 * BTH + c * CS * H, dgam)
    # gradient of the chunk-start state
    if not USE_PRE and not LAG:
        U = _dot(tl.trans(b_q), beta[:, None] * b_do, PREC)
        if MOMENTUM:
            Uf = _dot(tl.trans(b_q), f[:, None] * b_do, PREC)
    if LAG:  # through the carried state (its reads, its end state) and the predictions at W
        dW_new = dW_lag + _dot(tl.trans(b_kp), dYk, PREC)
    else:
        dW_new = betaL * dW + U + _dot(tl.trans(b_kp), dYk, PREC)
    if LQ:
        s, n = lq_scale(W, Q, QEPS)
        ds = ds_in + tl.sum(tl.sum(b_dkp * b_k.to(tl.float32), axis=1), axis=0)  # (b_dkp = dYk W^T)
        dW_new += ds * lq_scale_grad(W, s, n, Q)
    if MOMENTUM:
        dS = fL * dW + mL * dS + Uf
    return dW_new, dS


@triton.jit
def _load_states(hs, ss, dhs, dss, p_c, s_off, s_ok, BK: tl.constexpr, BV: tl.constexpr, MOMENTUM: tl.constexpr):
    """A chunk's start state (W, S: forward state pass) and end-state gradient (dW, dS: backward state pass) over
    one block of columns of its [K, V] slots; S, dS are zeros without momentum."""
    W = tl.load(hs + p_c + s_off, mask=s_ok, other=0.0).to(tl.float32)
    dW = tl.load(dhs + p_c + s_off, mask=s_ok, other=0.0)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if MOMENTUM:
        S = tl.load(ss + p_c + s_off, mask=s_ok, other=0.0).to(tl.float32)
        dS = tl.load(dss + p_c + s_off, mask=s_ok, other=0.0)
    return W, S, dW, dS


@triton.jit
def _bwd_grad_block(
    v, do, hs, ss, dhs, dss, dv, ddelta, xd, b_q, b_k, b_kp, b_d, beta, f, gL, nL, t_idx, t_ok, at_L,
    p_c, p_v, p_g, p_part, o_t, o_k, k_ok, v0,
    H: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BVL: tl.constexpr,
    BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
    DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr, KP: tl.constexpr,
):
    """``_bwd_rows`` of the BVL columns from v0 with that block's states read from global memory (chunk-start W, S
    from the forward, end-of-chunk dW, dS from the backward state pass); stores dv (and Huber's ddelta)."""
    o_v = v0 + tl.arange(0, BVL)
    v_ok = o_v < V
    s_off = o_k[:, None] * V + o_v[None, :]
    s_ok = k_ok[:, None] & v_ok[None, :]
    tv_ok = t_ok[:, None] & v_ok[None, :]
    p_tv = p_v + t_idx[:, None] * H * V + o_v[None, :]
    W, S, dW, dS = _load_states(hs, ss, dhs, dss, p_c, s_off, s_ok, BK, BVL, MOMENTUM)
    b_v = tl.load(v + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
    b_do = tl.load(do + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
    Xd = tl.load(xd + p_tv, mask=tv_ok, other=0.0)
    tl.static_assert(BIAS < 4, "a LayerNorm head runs its V-tile in one block (_bwd_chunk), never in sub-blocks")
    dV, dd, dYk, b_dq, b_dk, dAG, dAGT, dgL, dbeta, dnL, df, dmL, b_dkp, _, _, _, _, _ = _bwd_rows(
        b_q, b_k, b_kp, b_v, b_do, b_d, b_d, Xd, W, S, dW, dS, beta, f, gL, nL, t_ok, at_L, o_t, v_ok,
        V, BIAS, P, SMOOTH, EPS, DECAYED, MOMENTUM, PREC, KP, beta, 1.0, 0.0, dW, 1.0, k_ok, 0, 1.0, 1)
    tl.store(dv + p_tv, dV.to(dv.dtype.element_ty), mask=tv_ok)
    # (Huber's switch needs all of V: then BVL is the whole V, see _block_v_loop; no LayerNorm head here, so no BTH)
    store_huber_ddelta(ddelta, dd, p_part, p_g, t_idx, t_ok, 0, H, V, BIAS)
    return b_dq, b_dk, dAG, dAGT, dgL, dbeta, dnL, df, dmL, b_dkp


@triton.jit
def _bwd_grad_chunk(
    q, k, kp, v, eta, keep, mu, delta, do, hs, ss, dhs, dss, dq, dk, dkp, dv, deta, dla, dlm, ddelta, xd,
    c, T, NT, p_qk, p_v, p_g, p_s, p_part, o_t, o_k, k_ok, i_v,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, BVL: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr,
    EPS: tl.constexpr, HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr,
    KP: tl.constexpr,
):
    """The chunk-parallel gradient pass of chunk c over the program's V-tile (BV columns) in sub-blocks of BVL < BV
    columns whose ``_bwd_rows`` sums add up, so the gate coefficients and q, k are built once per chunk and only
    [K, BVL] state blocks are live at a time; then ``_bwd_grads`` finishes. (BVL == BV: ``_bwd_chunk`` on the whole
    tile, see the kernel.)"""
    t_idx, t_ok, L, _, _, beta, _, _, _, _, _, f, _, _, _, gL, nL, b_q, b_k = _bwd_setup(
        q, k, eta, keep, mu, c, T, p_qk, p_g, o_t, o_k, k_ok, H, K, BT, CS, HAS_KEEP, MOMENTUM, PREC)
    at_L = o_t == L
    qk_ok = t_ok[:, None] & k_ok[None, :]
    b_kp = b_k
    if KP:
        b_kp = tl.load(kp + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0)  # (dots only)
    b_d = huber_deltas(delta, p_g, t_idx, t_ok, BT, H, V, BIAS)
    p_c = p_s * NT + c.to(tl.int64) * K * V  # chunk slot of [B, H, NT, K, V]
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkp = tl.zeros([BT, BK], dtype=tl.float32)
    dAG = tl.zeros([BT, BT], dtype=tl.float32)
    dAGT = tl.zeros([BT, BT], dtype=tl.float32)
    dgL = tl.zeros([BT], dtype=tl.float32)
    dbeta = tl.zeros([BT], dtype=tl.float32)
    dnL = tl.zeros([BT], dtype=tl.float32)
    df = tl.zeros([BT], dtype=tl.float32)
    dmL = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    for i in range(BV // BVL):
        dq_i, dk_i, dAG_i, dAGT_i, dgL_i, dbeta_i, dnL_i, df_i, dmL_i, dkp_i = _bwd_grad_block(
            v, do, hs, ss, dhs, dss, dv, ddelta, xd, b_q, b_k, b_kp, b_d, beta, f, gL, nL, t_idx, t_ok, at_L,
            p_c, p_v, p_g, p_part, o_t, o_k, k_ok, i_v * BV + i * BVL,
            H, V, BK, BVL, BIAS, P, SMOOTH, EPS, DECAYED, MOMENTUM, PREC, KP)
        b_dq += dq_i
        b_dk += dk_i
        if KP:
            b_dkp += dkp_i
        dAG += dAG_i
        dAGT += dAGT_i
        dgL += dgL_i
        dbeta += dbeta_i
        dnL += dnL_i
        df += df_i
        dmL += dmL_i
    # the [BT, BT] gate coefficients again rather than kept live through the loop (they would spill)
    t0, t_end, _, _, _ = chunk_rows(c, T, o_t, BT, CS)
    eta_t, lb, beta, E, lm, m, NTm, G, f = gate_coeffs(
        eta + p_g, keep + p_g, mu + p_g, t0, t_end, H, o_t, BT, HAS_KEEP, MOMENTUM, PREC)
    ET, Nm, GT = gate_coeffs_t(eta_t, lb, lm, o_t, MOMENTUM, PREC)
    p_tk = p_part * K + p_qk + t_idx[:, None] * H * K + o_k[None, :]
    _bwd_grads(dq, dk, deta, dla, dlm, b_q, b_k, b_dq, b_dk, dAG, dAGT, dgL, dbeta, dnL, df, dmL,
               eta_t, lb, beta, E, lm, m, G, ET, Nm, GT, at_L, t_idx, t_ok, qk_ok, p_tk, p_part + p_g, o_t,
               H, HAS_KEEP, MOMENTUM, PREC)
    if KP:
        tl.store(dkp + p_tk, b_dkp.to(dkp.dtype.element_ty), mask=qk_ok)


# The gradient pass in two kernels (the default; ``MIRAS_KERNEL_GRAD_SPLIT=0`` runs the one-kernel MODE 2 instead),
# after fla's split of chunk_delta_rule's backward: what needs the whole K (the predictions y = kW, the bias rows, the
# gate gradients) and what needs only a block of K columns (dq, dk) run as separate programs, each light enough to
# keep its tiles in registers.


@triton.jit
def _grad_program(cf, i_bh, c, o_t, T, NT, BTH, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, CS: tl.constexpr, MOMENTUM: tl.constexpr):
    """Where a gradient-pass program's (b*h, chunk) lives: offsets of its q / k and v rows, gate columns and state
    slot, its tokens (t_idx, t_ok, last real one L), and the gate rows beta, g_L, n_L from ``_coeff_kernel``."""
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    p_qk = (i_b * T * H + i_h) * K
    p_v = (i_b * T * H + i_h) * V
    p_g = i_b * T * H + i_h
    p_c = (i_bh.to(tl.int64) * NT + c) * K * V
    t0, _, t_idx, t_ok, L = chunk_rows(c, T, o_t, BT, CS)
    beta, gL, nL, _, _, _ = _state_coeffs(cf, BTH, p_g, t_idx, t_ok, t0 + L, H, MOMENTUM)
    return p_qk, p_v, p_g, p_c, t_idx, t_ok, L, beta, gL, nL


@triton.jit
def _grad_v_block(hs, ss, dhs, dss, i, o_k, k_ok, p_v, p_c, t_idx, t_ok, H: tl.constexpr, V: tl.constexpr,
                  BKR: tl.constexpr, BVL: tl.constexpr, MOMENTUM: tl.constexpr):
    """V-block i (BVL columns) of a gradient-pass program: offsets and mask of its [BT, BVL] token rows, and its
    [BKR, BVL] blocks of W, S (chunk start) and dW, dS (chunk end) on the program's K rows o_k."""
    o_v = i * BVL + tl.arange(0, BVL)
    v_ok = o_v < V
    s_off = o_k[:, None] * V + o_v[None, :]
    s_ok = k_ok[:, None] & v_ok[None, :]
    W, S, dW, dS = _load_states(hs, ss, dhs, dss, p_c, s_off, s_ok, BKR, BVL, MOMENTUM)
    return p_v + t_idx[:, None] * H * V + o_v[None, :], t_ok[:, None] & v_ok[None, :], W, S, dW, dS


@triton.jit
def _trace(X, N: tl.constexpr):
    """Trace of an [N, N] block."""
    o = tl.arange(0, N)
    return tl.sum(tl.sum(tl.where(o[:, None] == o[None, :], X, 0.0), axis=1), axis=0)


@triton.jit
def _grad_rows_kernel(
    q, k, kp, v, eta, keep, mu, delta, do, hs, ss, dhs, dss, xd, cf, dv, ddelta, deta, dla, dlm, rr, dyk, mg,
    T, NT, BTH,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr,
    BVL: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
    HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr, KP: tl.constexpr,
):
    """Gradient pass, part 1: one program per (b*h, chunk) walks V in blocks of BVL columns with the chunk-start
    W, S (forward) and end-of-chunk dW, dS (backward state pass), y = k W [beta]:

        R = dl/dy (y; v),   dR = Xd - g_L k dW - n_L k dS,   (dY, dv, ddelta) = VJP of the bias rows at dR,
        dAG = -mask(dO R^T),  dbeta = sum_v dO . q W [+ dY . k W] [+ W_end row],  df = sum_v dO . q S [+ S_end row].

    Stores dv (and Huber's ddelta), every gate gradient (``_gate_grads``), and for part 2: R, dYk = dY [beta]
    (rr, dyk) and the chunk's dAG . G (mg [B, H, NT, BT, BT])."""
    i_bh, c = tl.program_id(0), tl.program_id(1)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    k_ok = o_k < K
    p_qk, p_v, p_g, p_c, t_idx, t_ok, L, beta, gL, nL = _grad_program(cf, i_bh, c, o_t, T, NT, BTH, H, K, V, BT,
                                                                       CS, MOMENTUM)
    at_L = o_t == L
    qk_ok = t_ok[:, None] & k_ok[None, :]
    # q and k only enter dots here: kept in the input dtype (bf16 halves their registers; _dot casts anyway)
    b_q = tl.load(q + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0)
    b_k = tl.load(k + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0)
    b_kp = b_k  # the predictions' keys (KP: their own, the exact delta rule's)
    if KP:
        b_kp = tl.load(kp + p_qk + t_idx[:, None] * H * K + o_k[None, :], mask=qk_ok, other=0.0)
    b_d = huber_deltas(delta, p_g, t_idx, t_ok, BT, H, V, BIAS)
    dAG = tl.zeros([BT, BT], dtype=tl.float32)
    dgL = tl.zeros([BT], dtype=tl.float32)
    dnL = tl.zeros([BT], dtype=tl.float32)
    dbeta = tl.zeros([BT], dtype=tl.float32)
    df = tl.zeros([BT], dtype=tl.float32)
    # <dW_end, W>, <dW_end, S>, <dS_end, S> as traces of block products summed over V on tensor cores: 26% fewer
    # instructions than elementwise products with a full reduction per block (static sm_90 profile, D=128)
    sWW = tl.zeros([BVL, BVL], dtype=tl.float32)
    sWS = sWW
    sSS = sWW
    small = b_d == b_d  # Huber's branch per row: ||r|| over all of V, added up over the V-blocks in a first walk
    if BIAS == 3:
        r2 = tl.zeros([BT], dtype=tl.float32)
        for i in range((V + BVL - 1) // BVL):
            p_tv, tv_ok, W, _, _, _ = _grad_v_block(hs, ss, dhs, dss, i, o_k, k_ok, p_v, p_c, t_idx, t_ok,
                                                    H, V, BK, BVL, MOMENTUM)
            b_y = _dot(b_kp, W, PREC)
            if DECAYED:
                b_y = b_y * beta[:, None]
            b_r = b_y - tl.load(v + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
            r2 += tl.sum(b_r * b_r, axis=1)
        small = huber_switch(r2, b_d)
    ddelta_ = tl.zeros([BT], dtype=tl.float32)
    for i in range((V + BVL - 1) // BVL):
        p_tv, tv_ok, W, S, dW, dS = _grad_v_block(hs, ss, dhs, dss, i, o_k, k_ok, p_v, p_c, t_idx, t_ok,
                                                  H, V, BK, BVL, MOMENTUM)
        b_v = tl.load(v + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
        b_yk = _dot(b_kp, W, PREC)
        b_y = b_yk
        if DECAYED:
            b_y = b_yk * beta[:, None]
        if BIAS >= 4:  # behind a LayerNorm head: one block of all of V (_grad_pass), its weight row
            o_v = i * BVL + tl.arange(0, BVL)
            b_w = tl.load(delta + (p_g % H) * V + o_v, mask=o_v < V, other=0.0)
            R = tl.where(t_ok[:, None], ln_rows(b_y, b_v, b_w, b_d, o_v < V, V, BIAS - 4, P, SMOOTH, EPS), 0.0)
        else:
            R = tl.where(t_ok[:, None], bias_rows_sw(b_y, b_v, b_d, small, BIAS, P, SMOOTH, EPS), 0.0)
        KdW = _dot(b_k, dW, PREC)
        dR = tl.load(xd + p_tv, mask=tv_ok, other=0.0) - gL[:, None] * KdW
        dgL -= tl.sum(KdW * R, axis=1)
        dbeta += tl.sum(b_do * _dot(b_q, W, PREC), axis=1)
        sWW += _dot(tl.trans(dW), W, PREC)
        if MOMENTUM:
            KdS = _dot(b_k, dS, PREC)
            dR -= nL[:, None] * KdS
            dnL -= tl.sum(KdS * R, axis=1)
            df += tl.sum(b_do * _dot(b_q, S, PREC), axis=1)
            sWS += _dot(tl.trans(dW), S, PREC)
            sSS += _dot(tl.trans(dS), S, PREC)
        dR = tl.where(t_ok[:, None], dR, 0.0)
        if BIAS >= 4:
            dY, dV, dWl, dd = ln_rows_bwd(b_y, b_v, b_w, b_d, dR, o_v < V, V, BIAS - 4, P, SMOOTH, EPS)
            tl.store(ddelta + p_tv, dWl, mask=tv_ok)
        else:
            dY, dV, dd = bias_rows_bwd_sw(b_y, b_v, b_d, small, dR, BIAS, P, SMOOTH, EPS)
        ddelta_ += dd
        dYk = dY
        if DECAYED:
            dYk = dY * beta[:, None]
            dbeta += tl.sum(dY * b_yk, axis=1)
        dAG += _dot(b_do, tl.trans(R), PREC)
        tl.store(dv + p_tv, dV.to(dv.dtype.element_ty), mask=tv_ok)
        tl.store(rr + p_tv, R.to(rr.dtype.element_ty), mask=tv_ok)
        tl.store(dyk + p_tv, dYk.to(dyk.dtype.element_ty), mask=tv_ok)
    store_huber_ddelta(ddelta, ddelta_, 0, p_g, t_idx, t_ok, BTH, H, V, BIAS)  # (one V-tile: no partial sums)
    t0, t_end, _, _, _ = chunk_rows(c, T, o_t, BT, CS)
    eta_t, lb, beta, E, lm, m, NTm, G, f = gate_coeffs(
        eta + p_g, keep + p_g, mu + p_g, t0, t_end, H, o_t, BT, HAS_KEEP, MOMENTUM, PREC)
    ET, Nm, GT = gate_coeffs_t(eta_t, lb, lm, o_t, MOMENTUM, PREC)
    dAG = -tl.where(o_t[:, None] >= o_t[None, :], dAG, 0.0)
    dbeta += tl.where(at_L, _trace(sWW, BVL), 0.0)
    dmL = 0.0
    if MOMENTUM:
        df += tl.where(at_L, _trace(sWS, BVL), 0.0)
        dmL = _trace(sSS, BVL)
    tl.store(mg + (i_bh.to(tl.int64) * NT + c) * BT * BT + o_t[:, None] * BT + o_t[None, :], dAG * G)
    _gate_grads(deta, dla, dlm, _dot(b_q, tl.trans(b_k), PREC), dAG, dgL, dbeta, dnL, df, dmL,
                eta_t, lb, beta, E, lm, m, ET, Nm, at_L, t_idx, t_ok, p_g, o_t, H, HAS_KEEP, MOMENTUM, PREC)


@triton.jit
def _grad_qk_kernel(
    q, k, do, hs, ss, dhs, dss, rr, dyk, mg, cf, dq, dk, dkp,
    T, NT, BTH,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BKB: tl.constexpr,
    BVL: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr, KP: tl.constexpr,
):
    """Gradient pass, part 2: one program per (K-block of BKB columns, b*h, chunk) walks V in blocks of BVL:

        dq = beta dO W^T + f dO S^T + (dAG . G) k,   dk = dYk W^T - (g_L R) dW^T - (n_L R) dS^T + (dAG . G)^T q

    on the block's columns of q, k, dq, dk (rows of the states), from part 1's R, dYk and dAG . G. KP: the
    predictions' own keys take dYk W^T (dkp), and dk keeps the rest."""
    i_kb, i_bh, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = tl.arange(0, BT)
    o_k = i_kb * BKB + tl.arange(0, BKB)
    k_ok = o_k < K
    p_qk, p_v, p_g, p_c, t_idx, t_ok, L, beta, gL, nL = _grad_program(cf, i_bh, c, o_t, T, NT, BTH, H, K, V, BT,
                                                                       CS, MOMENTUM)
    qk_ok = t_ok[:, None] & k_ok[None, :]
    p_tk = p_qk + t_idx[:, None] * H * K + o_k[None, :]
    dOW = tl.zeros([BT, BKB], dtype=tl.float32)  # dO W^T
    dOS = tl.zeros([BT, BKB], dtype=tl.float32)  # dO S^T
    b_dk = tl.zeros([BT, BKB], dtype=tl.float32)
    b_dkp = tl.zeros([BT, BKB], dtype=tl.float32)
    for i in range((V + BVL - 1) // BVL):
        p_tv, tv_ok, W, S, dW, dS = _grad_v_block(hs, ss, dhs, dss, i, o_k, k_ok, p_v, p_c, t_idx, t_ok,
                                                  H, V, BKB, BVL, MOMENTUM)
        b_do = tl.load(do + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
        R = tl.load(rr + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
        dYk = tl.load(dyk + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
        dOW += _dot(b_do, tl.trans(W), PREC)
        if KP:
            b_dkp += _dot(dYk, tl.trans(W), PREC)
            b_dk -= _dot(gL[:, None] * R, tl.trans(dW), PREC)
        else:
            b_dk += _dot(dYk, tl.trans(W), PREC) - _dot(gL[:, None] * R, tl.trans(dW), PREC)
        if MOMENTUM:
            dOS += _dot(b_do, tl.trans(S), PREC)
            b_dk -= _dot(nL[:, None] * R, tl.trans(dS), PREC)
    p_m = mg + (i_bh.to(tl.int64) * NT + c) * BT * BT
    M = tl.load(p_m + o_t[:, None] * BT + o_t[None, :])  # dAG . G
    MT = tl.load(p_m + o_t[None, :] * BT + o_t[:, None])  # its transpose, read transposed (no tl.trans)
    b_q = tl.load(q + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
    b_dq = beta[:, None] * dOW + _dot(M, b_k, PREC)
    if MOMENTUM:
        f = tl.load(cf + 2 * BTH + p_g + t_idx * H, mask=t_ok, other=0.0)
        b_dq += f[:, None] * dOS
    b_dk += _dot(MT, b_q, PREC)
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=qk_ok)
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=qk_ok)
    if KP:
        tl.store(dkp + p_tk, b_dkp.to(dkp.dtype.element_ty), mask=qk_ok)


@triton.jit
def _linear_bwd_kernel(
    q, k, kp, v, eta, keep, mu, delta, hs, ss, do, dht, dst, dhs, dss, xd, cf, dsc, leta, lkeep, thr,
    dq, dk, dkp, dv, deta, dla, dlm, ddelta, dh0, ds0, dlag,
    T, NT, BTH,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
    HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr,
    HAS_DHT: tl.constexpr, HAS_DST: tl.constexpr, PREC: tl.constexpr, MODE: tl.constexpr,
    BVL: tl.constexpr, CF: tl.constexpr, KP: tl.constexpr,
    LQ: tl.constexpr = False, Q: tl.constexpr = 2.0, QEPS: tl.constexpr = 1e-6,
    LAG: tl.constexpr = 0, SCALE: tl.constexpr = 1.0, NLAG: tl.constexpr = 1,
):
    """LQ (Lq retention; the walks take all of V, kp = s k): dsc [B*H, NT] holds the gradient of each chunk's read
    scale from the reads (``_bwd_chunk``). LAG (a lag-token retention; the gradient pass in one kernel on whole
    V-tiles, ``_bwd_chunk``): dlag [NV, 3, B, T, H] takes the lag tokens' gate gradients."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    k_ok, v_ok = o_k < K, o_v < V
    p_qk = (i_b * T * H + i_h) * K
    p_v = (i_b * T * H + i_h) * V
    p_g = i_b * T * H + i_h
    p_part = i_v.to(tl.int64) * BTH  # partial-sum slot of this V-tile ([NV, B, T, H] gates, x K for dq / dk)
    p_s = i_bh.to(tl.int64) * K * V
    s_off = o_k[:, None] * V + o_v[None, :]
    s_ok = k_ok[:, None] & v_ok[None, :]

    if MODE == 3:  # one chunk: the pre-pass (U, Uf into the dhs / dss slots that the state pass then overwrites)
        c = tl.program_id(2)
        p_c = p_s * NT + c.to(tl.int64) * K * V
        _bwd_pre_chunk(q, k, eta, keep, mu, do, xd, dhs, dss, c, T, p_qk, p_v, p_g, p_c, s_off, s_ok,
                       o_t, o_k, o_v, k_ok, v_ok, H, K, V, BT, CS, HAS_KEEP, MOMENTUM, PREC)
    elif MODE == 2 and BVL < BV:  # one chunk, its V-tile in sub-blocks (states read block by block)
        _bwd_grad_chunk(q, k, kp, v, eta, keep, mu, delta, do, hs, ss, dhs, dss, dq, dk, dkp, dv, deta, dla, dlm,
                        ddelta, xd, tl.program_id(2), T, NT, p_qk, p_v, p_g, p_s, p_part, o_t, o_k, k_ok, i_v,
                        H, K, V, BT, CS, BK, BV, BVL, BIAS, P, SMOOTH, EPS, HAS_KEEP, DECAYED, MOMENTUM, PREC, KP)
    elif MODE == 2:  # one chunk: start state from the forward, end-state gradient from the backward state pass
        c = tl.program_id(2)
        p_c = p_s * NT + c.to(tl.int64) * K * V
        W, S, dW, dS = _load_states(hs, ss, dhs, dss, p_c, s_off, s_ok, BK, BV, MOMENTUM)
        _bwd_chunk(q, k, kp, v, eta, keep, mu, delta, do, dq, dk, dkp, dv, deta, dla, dlm, ddelta, xd, cf,
                   W, S, dW, dS, dW, dS, 0.0, c, T, BTH, p_qk, p_v, p_g, p_part, o_t, o_k, o_v, k_ok, v_ok,
                   H, K, V, BT, CS, BIAS, P, SMOOTH, EPS, HAS_KEEP, DECAYED, MOMENTUM, PREC, True, False, False, KP,
                   False, Q, QEPS, leta, lkeep, thr, dlag, LAG, SCALE, NLAG)
    else:
        dW = tl.zeros([BK, BV], dtype=tl.float32)
        dS = tl.zeros([BK, BV], dtype=tl.float32)
        S = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_DHT:
            dW = tl.load(dht + p_s + s_off, mask=s_ok, other=0.0).to(tl.float32)
        if HAS_DST:
            dS = tl.load(dst + p_s + s_off, mask=s_ok, other=0.0).to(tl.float32)
        for cc in range(NT):
            c = NT - 1 - cc
            p_c = p_s * NT + c * K * V
            U = dW
            Uf = dS
            if MODE == 1:  # read the pre-pass terms of this chunk, then leave dW_end (dS_end) in their slots
                U = tl.load(dhs + p_c + s_off, mask=s_ok, other=0.0)
                tl.store(dhs + p_c + s_off, dW, mask=s_ok)
                if MOMENTUM:
                    Uf = tl.load(dss + p_c + s_off, mask=s_ok, other=0.0)
                    tl.store(dss + p_c + s_off, dS, mask=s_ok)
            W = tl.load(hs + p_c + s_off, mask=s_ok, other=0.0).to(tl.float32)
            if MOMENTUM:
                S = tl.load(ss + p_c + s_off, mask=s_ok, other=0.0).to(tl.float32)
            ds_in = 0.0
            if LQ:
                ds_in = tl.load(dsc + i_bh * NT + c)
            dW, dS = _bwd_chunk(q, k, kp, v, eta, keep, mu, delta, do, dq, dk, dkp, dv, deta, dla, dlm, ddelta, xd,
                                cf, W, S, dW, dS, U, Uf, ds_in, c, T, BTH, p_qk, p_v, p_g, p_part, o_t, o_k, o_v,
                                k_ok, v_ok, H, K, V, BT, CS, BIAS, P, SMOOTH, EPS, HAS_KEEP, DECAYED, MOMENTUM, PREC,
                                MODE == 0, MODE == 1, MODE == 1 and CF, KP, LQ, Q, QEPS, leta, lkeep, thr, dlag, LAG,
                                SCALE, NLAG)
        tl.store(dh0 + p_s + s_off, dW, mask=s_ok)
        if MOMENTUM:
            tl.store(ds0 + p_s + s_off, dS, mask=s_ok)


# ------------------------------------------------------------------------------------------------ launch + autograd

_KEY = ["H", "K", "V", "BT", "CS", "BK", "BV", "BIAS", "HAS_KEEP", "DECAYED", "MOMENTUM", "MODE", "CF", "KP", "LQ",
        "LAG"]
_BWD_KEY = [*_KEY, "BVL"]
# 8 warps: 4 warps spill more and compile 2x slower (ptxas report, sm_90, D=128), and Triton >= 3.6 has open Hopper
# wgmma illegal-address bugs for multi-dot kernels at num_warps=4 with 32-wide tiles (triton #10486, #11366, #10573);
# keep the list short, each config of the backward compiles for ~10-40 s
_CONFIGS = [triton.Config({}, num_warps=8, num_stages=s) for s in (1, 2)]
_linear_fwd_tuned = triton.autotune(configs=_CONFIGS, key=_KEY)(_linear_fwd_kernel)
# the autotuner times every config by running the kernel several times on the real arguments; the backward state pass
# (MODE 1) is not idempotent: it reads the pre-pass terms U / U_f from dhs / dss and leaves the end-of-chunk state
# gradients in their place, so those two buffers must be restored between timing runs (else the first backward of
# every new shape returns wrong gradients: tests/test_kernels.py::test_backward_survives_autotuning)
BWD_IN_PLACE = ["dhs", "dss"]
_linear_bwd_tuned = triton.autotune(configs=_CONFIGS, key=_BWD_KEY, restore_value=BWD_IN_PLACE)(_linear_bwd_kernel)
_grad_rows_tuned = triton.autotune(
    configs=_CONFIGS, key=[*_KEY[:5], "BVL", "BIAS", "HAS_KEEP", "DECAYED", "MOMENTUM", "KP"])(_grad_rows_kernel)
_grad_qk_tuned = triton.autotune(configs=_CONFIGS, key=[*_KEY[:5], "BKB", "BVL", "MOMENTUM", "KP"])(_grad_qk_kernel)


def _block_v(V: int, bias: int, state_pass: bool = False, lq: float = 0.0, lag: int = 0) -> int:
    """V-tile: the whole (padded) V by default and always for Huber (its switch needs the row norm over all of V),
    Lq retention (``lq``: its walks sum |W|^q over the whole state) and KL retention (``lag`` 2: a softmax over
    every row).

    ``state_pass``: the tile of the two sequential state passes (MODE 1), at most 64 unless
    ``MIRAS_KERNEL_BV_STATE`` says otherwise: they hold only the state tiles and their parallelism is the number of
    V-tiles, so smaller tiles pay there (H200, D=128, titans row: bwd state pass 1.07 ms at 64 vs 2.51 ms at 128, fwd
    0.67 vs 1.11), while the chunk-parallel gradient pass is faster with the whole V (2.77 vs 3.05 ms: its dq / dk
    work does not split over V-tiles; benchmarks/profile_passes.py, RESULTS.md "GPU session 6"). The state slots do
    not depend on the tiling, so the passes of one call may use different tiles.

    ``MIRAS_KERNEL_BV`` overrides it (powers of two >= 16; also in the interpreter, where the tests use it to cover
    several V-tiles). The whole V is the default on GPU because it is the only tile measured correct on Hopper
    (H200, triton 3.6: BV=128 with 8 warps matched; BV=32 with 4 warps gave wrong outputs and illegal addresses,
    while the same multi-tile kernels match the float64 oracle in the interpreter: a codegen problem, see
    benchmarks/RESULTS.md). The split kernels get their parallelism from the chunk axis instead.
    """
    full = _tile(V)
    if bias >= 3 or lq or lag == 2:  # (Huber's switch, a LayerNorm head's statistics, KL's softmax: whole rows;
        return full  # Lq's norm: the whole state)
    env = env_tile("MIRAS_KERNEL_BV")
    tile = min(full, env) if env else full
    if state_pass:
        env_state = env_tile("MIRAS_KERNEL_BV_STATE")
        tile = min(full, env_state) if env_state else min(tile, 64)
    return tile


def _block_v_loop(BV: int, bias: int) -> int:
    """Sub-block of the gradient pass: each program walks its V-tile (the two-kernel pass: all of V) in blocks of
    this many columns, reading only [K, sub-block] pieces of the states at a time, while q, k and the [BT, K] /
    [BT, BT] sums stay on chip (``_bwd_grad_chunk``, ``_grad_rows_kernel``, ``_grad_qk_kernel``).
    ``MIRAS_KERNEL_BV_LOOP`` (a power of two >= 16); default 64. Huber (``bias`` 3): the whole tile in the one-kernel
    pass, whose bias rows need the row norm over all of V at once; the two-kernel pass adds the norm up over the
    blocks in a first walk, so it asks with bias 0 (at D=128 in fp32, a whole-V Huber program needs 256-292 KB of
    shared memory, more than an H100 has).

    H200, triton 3.6, titans row (B=4 T=4096 H=8 D=128 bf16, 8 warps): the gradient pass takes 3.33 ms in one block
    of 128 and 2.63 ms in blocks of 64 at 2 stages; fwd+bwd 4.77 -> 4.10 ms at 1 stage, 4.65 -> 3.95 ms at 2 stages,
    correct at both (RESULTS.md, session 8). Blocks of 32 crashed (illegal address) at 1 stage: see ``_tile``."""
    env = env_tile("MIRAS_KERNEL_BV_LOOP")
    return BV if bias >= 3 else min(BV, env or 64)  # (a LayerNorm head, bias >= 4: whole rows in both passes)


def _grad_split() -> bool:
    """The backward's gradient pass as two kernels (``_grad_rows_kernel`` then ``_grad_qk_kernel``, the default) or
    as one (MODE 2 of ``_linear_bwd_kernel``; ``MIRAS_KERNEL_GRAD_SPLIT=0``). H200, triton 3.6, titans row (B=4
    T=4096 H=8 D=128 bf16, 8 warps, 2 stages): the pass takes 1.12 ms as two kernels, 2.29 ms as one; fwd+bwd 2.31
    vs 3.52 ms (RESULTS.md, GPU session 12)."""
    return env_switch("MIRAS_KERNEL_GRAD_SPLIT", True)


def _block_k_grad(K: int) -> int:
    """K-block of the gradient pass's second kernel (``_grad_qk_kernel``): ``MIRAS_KERNEL_BK_GRAD`` (a power of two
    >= 16), default 64, at most the K-tile."""
    return min(_tile(K), env_tile("MIRAS_KERNEL_BK_GRAD") or 64)


def _tile(n: int) -> int:
    """Tile of a head dim (K or V): ``pow2_tile``, and at least 64 on GPU, where narrower heads are padded (masked).

    On the H200 with triton 3.6 every 32-wide V-tile of these kernels went wrong: V-tiles of 32 at 4 warps (GPU run
    2, older kernels: wrong outputs, illegal addresses), state-pass tiles of 32 at 8 warps (wrong outputs, 0.43
    relative) and gradient-pass sub-blocks of 32 at 8 warps, 1 stage (illegal address), while tiles of 64 and 128
    always matched (RESULTS.md, GPU run 2 and sessions 6 and 8). Head dims below 64 have not run on a GPU since. The
    interpreter keeps the narrow tiles, so the CPU tests cover the padding masks at small head dims."""
    return pow2_tile(n) if interpreting() else max(64, pow2_tile(n))


def _split() -> bool:
    """Split kernels (state pass + chunk-parallel pass, the default) or the fused walk (``MIRAS_KERNEL_SPLIT=0``)."""
    return env_switch("MIRAS_KERNEL_SPLIT", True)


def _coeff_rows() -> bool:
    """The sequential state passes load per-token gate coefficients from ``_coeff_kernel`` (the default) or build
    the [BT, BT] coefficients at every step as the other passes do (``MIRAS_KERNEL_COEFFS=0``; kept to compare)."""
    value = os.environ.get("MIRAS_KERNEL_COEFFS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"MIRAS_KERNEL_COEFFS must be 0 or 1, but got MIRAS_KERNEL_COEFFS={value!r}")
    return value == "1"


def _launch(kernel_raw, kernel_tuned, grid, *args, grad_pass: bool = False, **kw):
    """Autotuned launch on GPU; the plain kernel in the interpreter or when ``MIRAS_KERNEL_CONFIG=warps,stages``
    fixes the config (skips autotuning, e.g. for quick correctness runs). The backward's gradient pass takes
    ``MIRAS_KERNEL_GRAD_CONFIG`` first (e.g. "8,1,128": 8 warps, 1 stage, at most 128 registers per thread, so that
    two programs share an SM: the pass is latency-bound at one program per SM, RESULTS.md session 8)."""
    if interpreting():
        return kernel_raw[grid](*args, **kw)
    fixed = (grad_pass and launch_config("MIRAS_KERNEL_GRAD_CONFIG")) or launch_config("MIRAS_KERNEL_CONFIG")
    if not fixed:
        return kernel_tuned[grid](*args, **kw)
    try:
        return kernel_raw[grid](*args, **fixed, **kw)
    except OutOfResources as err:
        if err.name != "shared memory" or fixed["num_stages"] == 1:
            raise
    # (outside the except block, so that an error of this launch does not chain the first one)
    shown = ("MODE", "BIAS", "BV", "PREC")
    _warn_one_stage(kernel_raw.__name__, fixed["num_stages"], tuple((n, kw[n]) for n in shown if n in kw))
    return kernel_raw[grid](*args, **{**fixed, "num_stages": 1}, **kw)


@cache
def _warn_one_stage(kernel: str, stages: int, constants: tuple[tuple[str, object], ...]) -> None:
    """Warn once per kernel specialisation that a fixed config with several pipeline stages did not fit in shared
    memory, so it runs at 1 stage. Autotuning drops such a config by itself (Triton times it as infinitely slow);
    a config fixed by ``MIRAS_KERNEL_CONFIG`` has no fallback otherwise. Seen on an H200 (triton 3.6), Huber at D=128
    with fp32 inputs (3xTF32 dots) at 2 stages: the backward state pass (the whole V per program) needs 257 KB and,
    with momentum, the gradient pass's rows kernel 272 KB, more than the 227 KB a Hopper program can have; at 1
    stage both fit and match the float64 oracle (RESULTS.md, GPU session 12)."""
    where = ", ".join(f"{n}={v}" for n, v in constants)
    warnings.warn(f"miras.kernels: {kernel} ({where}) at num_stages={stages} needs more shared memory than this GPU "
                  "has; launching it at num_stages=1", stacklevel=4)


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the forward's chunk-start state slots (hs, ss; the walks keep fp32 states on chip): bf16 for bf16
    inputs, as fla stores its chunk states, since the passes that read them use them as bf16 dot operands there
    anyway (and in the gradient pass's few state inner products); else fp32. ``MIRAS_KERNEL_STATES`` = ``auto``
    (that rule, the default), ``fp32`` or ``bf16``. The backward's state-gradient slots stay fp32: in bf16 the
    sequential backward state pass compiles to ~40% more instructions per step (static sm_90 profile, triton 3.6).
    H200, titans row at the bench shape: fwd+bwd 2.31 ms with bf16 slots, 2.62 ms with fp32 ones, both within the
    bf16 bound (RESULTS.md, GPU session 12)."""
    choice = env_choice("MIRAS_KERNEL_STATES", ("auto", "fp32", "bf16"), "auto")
    if choice == "auto":
        return torch.bfloat16 if dot_prec(x) == "bf16" else torch.float32
    return torch.bfloat16 if choice == "bf16" else torch.float32


def _modes(modes: tuple[int, ...] | None) -> tuple[int, ...]:
    """Kernel launches of one direction: split (default; the backward adds its pre-pass 3 before the state pass 1)
    or (0,) fused; one mode alone only to pre-compile (benchmarks/warm_kernels.py)."""
    return modes if modes is not None else (3, 1, 2) if _split() else (0,)


def _coefficients(cfg: LinearConfig, eta, keep, mu) -> torch.Tensor:
    """``_coeff_kernel``'s per-token coefficient rows [5, B, T, H] fp32 for the state passes (one program per
    (b*h, chunk); a few microseconds, so the backward builds its own rather than keeping the forward's)."""
    B, T, H = eta.shape
    cf = torch.empty(5, B, T, H, device=eta.device, dtype=torch.float32)
    _coeff_kernel[(B * H, triton.cdiv(T, cfg.chunk))](
        eta, keep if keep is not None else eta, mu if mu is not None else eta, cf, T, B * T * H,
        H=H, BT=chunk_block(cfg.chunk), CS=cfg.chunk, HAS_KEEP=cfg.has_keep, MOMENTUM=cfg.momentum)
    return cf


def linear_scan_fwd(cfg: LinearConfig, q, k, v, eta, keep, mu, delta, h0, s0, modes: tuple[int, ...] | None = None,
                    kp: torch.Tensor | None = None, lag: tuple[torch.Tensor, ...] | None = None):
    """Forward: (o, W_T, S_T, chunk-start W states, chunk-start S states, read scales). Split: state pass, then
    outputs per chunk. kp: keys of the predictions y = kp W of their own ([B, T, H, K]; the exact delta rule's,
    delta.py), else k. Lq retention (cfg.lq): the predictions are taken at s W, s = 1 / nu(W) of the chunk start,
    whose values come back as the read scales [B, H, NT] fp32 (else None); o stays q W_t (``LqScanFunction``).
    A lag-token retention (cfg.lag): ``lag`` = (leta, lkeep, thr), the chunks' first tokens' own gates ([B, T, H]
    fp32; eta and keep are 0 and 1 there) and elastic's thresholds [H] (``LagScanFunction``)."""
    modes = tuple(m for m in _modes(modes) if m != 3)
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = chunk_block(cfg.chunk), _tile(K), _block_v(V, cfg.bias, lq=cfg.lq, lag=cfg.lag)
    NT = triton.cdiv(T, cfg.chunk)
    f32 = dict(device=q.device, dtype=torch.float32)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    # (a lag-token retention's passes form each chunk's carried state from its slot: kept in fp32, so that they all
    # see the walk's state)
    hs = torch.empty(B, H, NT, K, V, device=q.device, dtype=torch.float32 if cfg.lag else _state_dtype(q))
    ss = torch.empty_like(hs) if cfg.momentum else hs
    ht = torch.empty(B, H, K, V, **f32)
    st = torch.empty(B, H, K, V, **f32) if cfg.momentum else ht
    use_cf = 1 in modes and _coeff_rows()
    cf = _coefficients(cfg, eta, keep, mu) if use_cf else ht
    sc = torch.empty(B, H, NT, **f32) if cfg.lq else ht
    args = (q, k, kp if kp is not None else k, v, eta, keep if keep is not None else eta,
            mu if mu is not None else eta, delta if delta is not None else eta, h0 if h0 is not None else ht,
            s0 if s0 is not None else ht, o, hs, ss, ht, st, cf, sc, *_lag_args(cfg, lag, eta), T, NT, B * T * H)
    kw = dict(H=H, K=K, V=V, BT=BT, CS=cfg.chunk, BK=BK, BV=BV, BIAS=cfg.bias, P=cfg.p, SMOOTH=cfg.smoothing, EPS=cfg.eps,
              HAS_KEEP=cfg.has_keep, DECAYED=cfg.decayed, MOMENTUM=cfg.momentum,
              HAS_H0=h0 is not None, HAS_S0=s0 is not None, PREC=dot_prec(q), CF=use_cf, KP=kp is not None,
              **_lq_constants(cfg), **_lag_constants(cfg))
    BV_S = _block_v(V, cfg.bias, state_pass=True, lq=cfg.lq, lag=cfg.lag)
    for mode in modes:
        bv = BV_S if mode == 1 else BV
        grid = (triton.cdiv(V, bv), B * H, NT) if mode == 2 else (triton.cdiv(V, bv), B * H)
        _launch(_linear_fwd_kernel, _linear_fwd_tuned, grid, *args, **{**kw, "BV": bv}, MODE=mode)
    return o, ht, (st if cfg.momentum else None), hs, (ss if cfg.momentum else None), (sc if cfg.lq else None)


def _lq_constants(cfg: LinearConfig) -> dict:
    """The kernels' Lq-retention constexprs (LQ, Q, QEPS)."""
    return dict(LQ=cfg.lq > 0, Q=cfg.lq or 2.0, QEPS=cfg.lq_eps)


def _lag_constants(cfg: LinearConfig) -> dict:
    """The kernels' lag-token-retention constexprs (LAG, SCALE, NLAG)."""
    return dict(LAG=cfg.lag, SCALE=cfg.lag_scale, NLAG=cfg.lag_rows)


def _lag_args(cfg: LinearConfig, lag: tuple[torch.Tensor, ...] | None, placeholder: torch.Tensor) -> tuple:
    """The kernels' (leta, lkeep, thr) pointers: a lag-token retention's, else placeholders (never read)."""
    if not cfg.lag:
        return placeholder, placeholder, placeholder
    if lag is None:
        raise ValueError("linear kernels: a lag-token retention (kl, elastic) needs its first tokens' gates and "
                         "thresholds (leta, lkeep, thr)")
    return lag


def linear_scan_bwd(cfg: LinearConfig, q, k, v, eta, keep, mu, delta, hs, ss, do, dht, dst,
                    modes: tuple[int, ...] | None = None, kp: torch.Tensor | None = None, dsc: torch.Tensor | None = None,
                    lag: tuple[torch.Tensor, ...] | None = None):
    """Backward: gradients of (q, k, v, eta, keep, mu, delta, W_0, S_0, kp (None without)). Split: a parallel
    pre-pass of the terms that do not depend on the state gradient, a reverse pass that stores the end-of-chunk state
    gradients ([B, H, NT, K, V] fp32), then every chunk's input gradients in parallel. Lq retention (cfg.lq): kp
    must be the scaled keys s k, and dsc [B, H, NT] the gradient of the read scales (None: zeros). A lag-token
    retention (cfg.lag, ``lag`` as for ``linear_scan_fwd``) runs the gradient pass as one kernel on whole V-tiles,
    and the gradients of its first tokens' gates (leta, lkeep at each chunk's first token, else 0) and of the
    thresholds [B, T, H] (summed outside) come back last, as one [3, B, T, H] tensor (else None)."""
    modes = _modes(modes)
    split = modes != (0,)
    grad_split = 2 in modes and _grad_split() and not cfg.lag
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = chunk_block(cfg.chunk), _tile(K), _block_v(V, cfg.bias, lq=cfg.lq, lag=cfg.lag)
    NT, NV = triton.cdiv(T, cfg.chunk), triton.cdiv(V, BV)
    NP = 1 if grad_split else NV  # partial sums of dq, dk and the gate gradients: one per V-tile in one kernel
    f32 = dict(device=q.device, dtype=torch.float32)
    # without partial sums the kernels store dq, dk in the input dtype (no reduction and cast afterwards)
    dq = torch.empty(NP, B, T, H, K, device=q.device, dtype=q.dtype if NP == 1 else torch.float32)
    dk = torch.empty_like(dq)
    dkp = torch.empty_like(dq) if kp is not None else dk
    dv = torch.empty(B, T, H, V, device=q.device, dtype=v.dtype)
    deta = torch.empty(NP, B, T, H, **f32)
    dla = torch.empty(NP, B, T, H, **f32) if cfg.has_keep else deta
    dlm = torch.empty(NP, B, T, H, **f32) if cfg.momentum else deta
    ddelta = torch.empty(NV, B, T, H, **f32) if cfg.bias == 3 else deta
    if cfg.bias >= 4:  # the rows of a LayerNorm head weight's gradient (all of V in one tile; then Huber's deltas')
        ddelta = torch.empty(B * T * H * (V + (cfg.bias == HUBER_LN)), **f32)
    dh0 = torch.empty(B, H, K, V, **f32)
    ds0 = torch.empty(B, H, K, V, **f32) if cfg.momentum else dh0
    dhs = torch.empty(hs.shape, **f32) if split else hs  # pre-pass U, then the end-of-chunk state gradients
    dss = torch.empty(hs.shape, **f32) if split and cfg.momentum else dhs
    xd = torch.empty(B, T, H, V, **f32) if split else dh0  # pre-pass Xd
    use_cf = 1 in modes and _coeff_rows()
    cf = _coefficients(cfg, eta, keep, mu) if use_cf or grad_split else dh0
    # absent gates / states: another tensor in their place (the kernels' constexpr flags keep them unread)
    gates = tuple(x if x is not None else eta for x in (keep, mu, delta))
    ss = ss if ss is not None else hs
    kp_ = kp if kp is not None else k
    if cfg.lq and kp is None:
        raise ValueError("linear_scan_bwd: Lq retention needs the scaled keys kp = s k of the forward's read scales")
    dsc = (dsc.contiguous() if dsc is not None else torch.zeros(B, H, NT, **f32)) if cfg.lq else dh0
    dlag = torch.zeros(NP, 3, B, T, H, **f32) if cfg.lag else dh0  # (written at the chunks' first tokens only)
    args = (q, k, kp_, v, eta, *gates, hs, ss, do,
            dht if dht is not None else dh0, dst if dst is not None else dh0, dhs, dss, xd, cf, dsc,
            *_lag_args(cfg, lag, eta), dq, dk, dkp, dv, deta, dla, dlm, ddelta, dh0, ds0, dlag, T, NT, B * T * H)
    kw = dict(H=H, K=K, V=V, BT=BT, CS=cfg.chunk, BK=BK, BV=BV, BIAS=cfg.bias, P=cfg.p, SMOOTH=cfg.smoothing, EPS=cfg.eps,
              HAS_KEEP=cfg.has_keep, DECAYED=cfg.decayed, MOMENTUM=cfg.momentum,
              HAS_DHT=dht is not None, HAS_DST=dst is not None, PREC=dot_prec(q), CF=use_cf, KP=kp is not None,
              **_lq_constants(cfg), **_lag_constants(cfg))
    BV_S = _block_v(V, cfg.bias, state_pass=True, lq=cfg.lq, lag=cfg.lag)
    for mode in modes:  # the state pass (MODE 1) writes no partial sums, so its V-tile may differ from the others'
        if mode == 2 and grad_split:
            _grad_pass(cfg, q, k, kp, v, eta, *gates, hs, ss, do, dhs, dss, xd, cf, dq, dk, dkp, dv, deta, dla, dlm,
                       ddelta)
            continue
        bv = BV_S if mode == 1 else BV
        grid = (triton.cdiv(V, bv), B * H, NT) if mode in (2, 3) else (triton.cdiv(V, bv), B * H)
        _launch(_linear_bwd_kernel, _linear_bwd_tuned, grid, *args, **{**kw, "BV": bv}, MODE=mode,
                BVL=bv if cfg.lag else _block_v_loop(bv, cfg.bias), grad_pass=mode == 2)
    dkeep = _partials(dla) / keep if cfg.has_keep else None
    dmu = _partials(dlm) / mu if cfg.momentum else None
    dd = _partials(ddelta) if cfg.bias == 3 else _head_grads(ddelta, cfg.bias, B, T, H, V) if cfg.bias >= 4 else None
    return (_partials(dq).to(q.dtype), _partials(dk).to(k.dtype), dv, _partials(deta), dkeep, dmu, dd,
            dh0, ds0 if cfg.momentum else None, _partials(dkp).to(kp.dtype) if kp is not None else None,
            _partials(dlag) if cfg.lag else None)


def _head_grads(ddelta: torch.Tensor, bias: int, B: int, T: int, H: int, V: int) -> torch.Tensor:
    """The gradient of a LayerNorm head's flat delta buffer (common.LN_HEAD) from the kernels' ddelta: the
    weight's [H * V] (its rows summed over B, T), then for Huber (HUBER_LN) its deltas' [B * T * H]."""
    dw = ddelta[: B * T * H * V].view(B, T, H, V).sum((0, 1)).flatten()
    return torch.cat([dw, ddelta[B * T * H * V :]]) if bias == HUBER_LN else dw


def _partials(x: torch.Tensor) -> torch.Tensor:
    """The sum of a gradient's partial sums over V-tiles (dim 0); a view when there is one."""
    return x[0] if x.shape[0] == 1 else x.sum(0)


def _grad_pass(cfg: LinearConfig, q, k, kp, v, eta, keep, mu, delta, hs, ss, do, dhs, dss, xd, cf,
               dq, dk, dkp, dv, deta, dla, dlm, ddelta) -> None:
    """The backward's gradient pass as two kernels: ``_grad_rows_kernel`` (dv, the gate gradients, and R, dYk,
    dAG . G for the second) then ``_grad_qk_kernel`` (dq, dk, and dkp for keys of the predictions' own; one program
    per K-block). keep, mu, delta, ss: the kernels' arguments (placeholders for absent ones, as ``linear_scan_bwd``
    passes them); kp None: the predictions use k."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT, NT, BKB = chunk_block(cfg.chunk), triton.cdiv(T, cfg.chunk), _block_k_grad(K)
    # both kernels walk all of V in blocks, Huber too (the rows kernel adds its row norm up over them first): the
    # non-Huber rule of _block_v_loop
    BVL = _block_v_loop(_tile(V), cfg.bias if cfg.bias >= 4 else 0)  # (a LayerNorm head: all of V at once)
    # R and dYk only enter part 2 as dot operands, which take bf16 for 16-bit inputs anyway
    rr = torch.empty(B, T, H, V, device=q.device, dtype=torch.bfloat16 if dot_prec(q) == "bf16" else torch.float32)
    dyk = torch.empty_like(rr)
    mg = torch.empty(B, H, NT, BT, BT, device=q.device, dtype=torch.float32)
    common = dict(H=H, K=K, V=V, BT=BT, CS=cfg.chunk, BVL=BVL, MOMENTUM=cfg.momentum, PREC=dot_prec(q),
                  KP=kp is not None, grad_pass=True)
    _launch(_grad_rows_kernel, _grad_rows_tuned, (B * H, NT),
            q, k, kp if kp is not None else k, v, eta, keep, mu, delta, do, hs, ss, dhs, dss, xd, cf, dv, ddelta,
            deta, dla, dlm, rr, dyk, mg, T, NT, B * T * H, **common, BK=_tile(K),
            BIAS=cfg.bias, P=cfg.p, SMOOTH=cfg.smoothing, EPS=cfg.eps, HAS_KEEP=cfg.has_keep, DECAYED=cfg.decayed)
    _launch(_grad_qk_kernel, _grad_qk_tuned, (triton.cdiv(K, BKB), B * H, NT),
            q, k, do, hs, ss, dhs, dss, rr, dyk, mg, cf, dq, dk, dkp, T, NT, B * T * H, **common, BKB=BKB)


class LinearScanFunction(torch.autograd.Function):
    """(q, k, v, eta, keep, mu, delta, h0, s0[, kp]) -> (o, W_T, S_T) with Triton forward and backward.

    Gates are fp32 [B, T, H]; keep / mu / delta / h0 / s0 may be None; states are fp32 [B, H, K, V]. A keep gate of
    shape [B, T, H, K] (one per key channel) runs the kernels of miras/kernels/linear_channel.py. kp: keys of the
    predictions y = kp W of their own, like k (the exact delta rule's WY keys, miras/kernels/delta.py; head gates
    only); None: the predictions use k.
    """

    @staticmethod
    def forward(ctx, cfg: LinearConfig, q, k, v, eta, keep, mu, delta, h0, s0, kp=None):
        ctx.channel = keep is not None and keep.dim() == 4
        if ctx.channel and (kp is not None or cfg.bias >= 4):
            what = "prediction keys kp of their own" if kp is not None else "a LayerNorm head's rows (bias >= 4)"
            raise ValueError(f"LinearScanFunction: {what} need a head (scalar) keep gate, but got a channel-wise "
                             f"keep of shape {tuple(keep.shape)}")
        if ctx.channel:
            o, ht, st, hs, ss = channel_scan_fwd(cfg, q, k, v, eta, keep, mu, delta, h0, s0)
        else:
            o, ht, st, hs, ss, _ = linear_scan_fwd(cfg, q, k, v, eta, keep, mu, delta, h0, s0, kp=kp)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, eta, keep, mu, delta, hs, ss, kp)
        ctx.set_materialize_grads(False)
        return o, ht, st

    @staticmethod
    def backward(ctx, do, dht, dst):
        q, k, v, eta, keep, mu, delta, hs, ss, kp = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
        dht = None if dht is None else dht.contiguous()
        dst = None if dst is None else dst.contiguous()
        if ctx.channel:
            grads = (*channel_scan_bwd(ctx.cfg, q, k, v, eta, keep, mu, delta, hs, ss, do.contiguous(), dht, dst), None)
        else:
            grads = linear_scan_bwd(ctx.cfg, q, k, v, eta, keep, mu, delta, hs, ss, do.contiguous(), dht, dst, kp=kp)
        return tuple(g if need else None for g, need in zip((None, *grads), ctx.needs_input_grad))


class LqScanFunction(torch.autograd.Function):
    """Lq retention (Moneta, Miras Eq. 24-25) on the linear kernels: (q, k, v, eta, keep, mu, delta, h0, s0) ->
    (o, A_T, S_T, s) with o_t = q_t A_t (unscaled) and s [B, H, NT] each chunk's read scale 1 / nu(A) of its start
    state, at which its predictions were taken (W = s A). The caller scales the reads (``kernels._lq_reads``); the
    gradient of s flows back into the states here (the walks' ``lq_scale_grad``), and the predictions' keys s k
    get theirs as the kernels' kp."""

    @staticmethod
    def forward(ctx, cfg: LinearConfig, q, k, v, eta, keep, mu, delta, h0, s0):
        o, ht, st, hs, ss, sc = linear_scan_fwd(cfg, q, k, v, eta, keep, mu, delta, h0, s0)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, eta, keep, mu, delta, hs, ss, sc)
        ctx.set_materialize_grads(False)
        return o, ht, st, sc

    @staticmethod
    def backward(ctx, do, dht, dst, dsc):
        q, k, v, eta, keep, mu, delta, hs, ss, sc = ctx.saved_tensors
        cfg = ctx.cfg
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
        s_tok = chunk_scales(sc, cfg.chunk, q.shape[1])  # [B, T, H]
        kp = (k.float() * s_tok[..., None]).to(k.dtype)
        *grads, dkp, _ = linear_scan_bwd(cfg, q, k, v, eta, keep, mu, delta, hs, ss, do.contiguous(),
                                      None if dht is None else dht.contiguous(),
                                      None if dst is None else dst.contiguous(), kp=kp, dsc=dsc)
        grads[1] = (grads[1].float() + dkp.float() * s_tok[..., None]).to(k.dtype)  # dk: k's own roles + s dkp
        return tuple(g if need else None for g, need in zip((None, *grads), ctx.needs_input_grad))


class LagScanFunction(torch.autograd.Function):
    r"""A lag-token retention (elastic net, Miras Eq. 22; KL, Memora, Miras Eq. 21, 27; chunked as Miras Eq. 30) of
    the linear memory with plain GD on the linear kernels: (q, k, v, eta, keep, delta, h0, leta, lkeep, thr) ->
    (o, W_T). Per chunk with start state W, all gradients at W, and the state carried from the first token on

        Wc = S_gam(a0 W - e0 k0^T r0)  or  c softmax_V(a0 log W - e0 k0^T r0)        (``common.lag_carry``)
        W_t = beta_t Wc - sum_{1<=j<=t} G[t, j] k_j^T R_j,   o_t = q_t W_t

    eta and keep are the gates with 0 and 1 at each chunk's first token (so that its update is not also taken
    linearly), leta and lkeep the gates themselves ([B, T, H] fp32; the walks read them at the first tokens), thr
    elastic's threshold per head [H] (a placeholder for KL). The gradients of leta, lkeep come back at the first
    tokens only, so that the caller's gates get both parts."""

    @staticmethod
    def forward(ctx, cfg: LinearConfig, q, k, v, eta, keep, delta, h0, leta, lkeep, thr):
        lag = (leta, lkeep, thr)
        o, ht, _, hs, _, _ = linear_scan_fwd(cfg, q, k, v, eta, keep, None, delta, h0, None, lag=lag)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, eta, keep, delta, hs, leta, lkeep, thr)
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, eta, keep, delta, hs, leta, lkeep, thr = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
        dq, dk, dv, deta, dkeep, _, dd, dh0, _, _, dlag = linear_scan_bwd(
            ctx.cfg, q, k, v, eta, keep, None, delta, hs, None, do.contiguous(),
            None if dht is None else dht.contiguous(), None, lag=(leta, lkeep, thr))
        grads = (None, dq, dk, dv, deta, dkeep, dd, dh0, dlag[0], dlag[1], dlag[2].sum((0, 1)))
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def chunk_scales(sc: torch.Tensor, chunk: int, T: int) -> torch.Tensor:
    """Per-chunk scalars [B, H, NT] as per-token [B, T, H] (token t takes its chunk's)."""
    return sc.repeat_interleave(chunk, dim=2)[:, :, :T].transpose(1, 2)
