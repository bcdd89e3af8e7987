"""Triton kernels of the linear memory with a key-channel retention gate (``retention.gate.granularity: channel``,
GLA-style decay), forward and backward, and their autograd Function.

The linear memory ``y = k W`` (W: [K, V] per head) keeps one gate per key channel, alpha_t in R^K, and takes every
gradient of a chunk at the chunk-start state (Titans Eq. 12-16, Miras Eq. 28). Per token of a chunk (start W_0, S_0):

    P_t = W_0 (grad_at previous) or diag(b_t) W_0 (decayed),  b_t = prod_{i<=t} alpha_i,  R_t = dl/dy (k_t P_t; v_t)
    gd:        W_t = diag(alpha_t) W_{t-1} - eta_t k_t^T R_t
    momentum:  S_t = mu_t S_{t-1} - eta_t k_t^T R_t,  W_t = diag(alpha_t) W_{t-1} + S_t
    o_t = q_t W_t                                                                           (read after the write)

R is fixed within the chunk, so each key channel c (row W[c, :]) follows the scalar-gate recurrence of
``common.gate_coeffs`` with its own gates alpha_c. The chunk's closed form is the scalar one with b, f and G made
vectors over the channels:

    W_L = diag(b_L) W_0 + diag(f_L) S_0 - (k . GL)^T R,          GL[j, c] = G_c[L, j]
    S_L = m_L S_0 - (k . n_L)^T R
    o   = (q . b) W_0 + (q . f) S_0 - AG R,                        AG[t, j] = sum_c q_tc G_c[t, j] k_jc

No ratio b_t / b_j is ever formed, so no channel overflows however small its gates, which the factorised form
(q . b)(k / b)^T would: every decay is the exp of a difference of log-cumsums that is <= 0.
- gd (G_c = E_c diag(eta), E_c[t, j] = b_tc / b_jc): GLA's secondary chunking (``_gd_scores``). Across sub-chunks of
  16 rows, exp(lb_t - lb_j) = exp(lb_t - lb_r) exp(lb_r - lb_j) with r the row just before t's sub-chunk (both
  factors <= 1): one [BT, K] x [K, BT] dot per sub-chunk. Within a sub-chunk, 16 steps over [BT, K] blocks. The
  backward's dq, dk (``_gd_pairs``) are split alike, and the gate gradients follow from them in closed
  form (d log b = q . dq - k . dk, plus the end row's and the reads' terms).
- momentum (G_c = E_c N^T, the momentum path N shared by the channels): channel by channel, each channel's
  [BT, BT] block G_c and a [BT, BT] x [BT, BT] dot, and the scalar gate-gradient chain (``common.gate_grads``) once
  per channel; eta and mu sum their parts. K times the work of a head gate: written to be exact first.
One program per (V-tile, batch*head) walks the chunks with its columns of the [K, V] state on chip, forward, then
in reverse for the backward (chunk-start states kept from the forward, fp32); the columns are independent given the
gates, and the gradients that sum over V (dq, dk and the gates') are partial sums per V-tile that the host adds.
``linear.LinearScanFunction`` runs these kernels for a keep gate of shape [B, T, H, K].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from miras.kernels.common import (
    RuleConfig,
    _dot,
    _row_select,
    _vec_select,
    bias_rows,
    bias_rows_bwd,
    chunk_block,
    chunk_rows,
    dot_prec,
    gate_coeffs,
    gate_coeffs_t,
    gate_grads,
    interpreting,
    pow2_tile,
)
from miras.kernels.settings import env_tile, launch_config


@triton.jit
def _col(X, o_k, c):
    """Column c of a [BT, BK] block, as a [BT] vector."""
    return tl.sum(tl.where(o_k[None, :] == c, X, 0.0), axis=1)


@triton.jit
def _chunk_inputs(q, k, v, eta, keep, mu, delta, c, T, p_qk, p_v, p_g, o_t, o_k, o_v, k_ok, v_ok,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
                  BIAS: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Chunk c's rows (``chunk_rows``), inputs in fp32 and its per-channel and shared gate pieces: lb = log-cumsum of
    the keep gates [BT, BK] (0 on padding, so b = exp(lb) = 1 there), eta, lm = log-cumsum of mu, m = exp(lm) and
    NT[r, j] = N[j, r] (the momentum path from token j to token r; diag(eta) for gd), as in common.gate_coeffs."""
    t0, t_end, t_idx, t_ok, L = chunk_rows(c, T, o_t, BT, CS)
    qk_ok = t_ok[:, None] & k_ok[None, :]
    tv_ok = t_ok[:, None] & v_ok[None, :]
    p_tk = p_qk + t_idx[:, None] * H * K + o_k[None, :]
    p_tv = p_v + t_idx[:, None] * H * V + o_v[None, :]
    b_q = tl.load(q + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
    lb = tl.cumsum(tl.log(tl.load(keep + p_tk, mask=qk_ok, other=1.0).to(tl.float32)), axis=0)
    # the gates every channel shares (eta, mu): the scalar coefficients without a keep gate
    eta_t, _, _, _, lm, m, NT, _, _ = gate_coeffs(eta + p_g, eta + p_g, mu + p_g, t0, t_end, H, o_t, BT, False,
                                                  MOMENTUM, PREC)
    if BIAS == 3:
        b_d = tl.load(delta + p_g + t_idx * H, mask=t_ok, other=1.0).to(tl.float32)
    else:
        b_d = tl.zeros([BT], dtype=tl.float32)
    return t_idx, t_ok, L, qk_ok, tv_ok, p_tk, p_tv, b_q, b_k, b_v, b_d, lb, eta_t, lm, m, NT


@triton.jit
def _channel_gate(lb, eta_t, NT, o_k, o_t, c, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Channel c's log-cumsum lb_c, E_c[t, r] = exp(lb_c[t] - lb_c[r]) (causal) and G_c = E_c N^T (E_c diag(eta)
    for gd)."""
    lb_c = _col(lb, o_k, c)
    causal = o_t[:, None] >= o_t[None, :]
    E = tl.where(causal, tl.exp(tl.where(causal, lb_c[:, None] - lb_c[None, :], 0.0)), 0.0)
    if MOMENTUM:
        G = _dot(E, NT, PREC)
    else:
        G = E * eta_t[None, :]
    return lb_c, E, G


@triton.jit
def _channel_sums(b_q, b_k, lb, eta_t, lm, m, NT, o_k, o_t, L, K: tl.constexpr, MOMENTUM: tl.constexpr,
                  PREC: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The chunk's channel-summed coefficients: AG [BT, BT] (causal; with TRANSPOSED its transpose AG^T, built
    directly: no tl.trans of dot results, the Hopper hazard of fla #640), GL [BT, BK] (GL[j, c] = G_c[L, j]) and
    f [BT, BK] (f[t, c] = sum_{r<=t} E_c[t, r] m_r; 0 for gd). gd: ``_gd_scores``; momentum: channel by channel,
    from each channel's G_c (G_c^T from ``common.gate_coeffs_t``)."""
    BT: tl.constexpr = o_t.shape[0]
    F = tl.zeros([BT, o_k.shape[0]], dtype=tl.float32)
    if MOMENTUM:
        AG = tl.zeros([BT, BT], dtype=tl.float32)
        GL = tl.zeros([BT, o_k.shape[0]], dtype=tl.float32)
        for c in range(K):
            lb_c, E, G = _channel_gate(lb, eta_t, NT, o_k, o_t, c, MOMENTUM, PREC)
            if TRANSPOSED:
                GT = gate_coeffs_t(eta_t, lb_c, lm, o_t, MOMENTUM, PREC)[2]
                AG += (_col(b_k, o_k, c)[:, None] * _col(b_q, o_k, c)[None, :]) * GT
            else:
                AG += (_col(b_q, o_k, c)[:, None] * _col(b_k, o_k, c)[None, :]) * G
            at_c = o_k[None, :] == c
            GL += tl.where(at_c, _row_select(G, o_t, L)[:, None], 0.0)
            F += tl.where(at_c, tl.sum(E * m[None, :], axis=1)[:, None], 0.0)
    else:  # G_c = E_c diag(eta): no loop over the channels
        AG = _gd_scores(b_q, b_k, lb, eta_t, o_t, BT, PREC, TRANSPOSED)
        GL = _end_decay(lb, o_t, L) * eta_t[:, None]
    return AG, GL, F


SUB = tl.constexpr(16)  # rows of a sub-chunk in the gd path's secondary chunking (GLA)


@triton.jit
def _sub_rows(X, jj, BT: tl.constexpr):
    """[BT, N] -> [BT, N] whose row t is X's row jj of t's sub-chunk (row SUB * (t // SUB) + jj)."""
    NS: tl.constexpr = BT // SUB
    X3 = tl.reshape(X, (NS, SUB, X.shape[1]))
    o_s = tl.arange(0, SUB)
    row = tl.sum(tl.where(o_s[None, :, None] == jj, X3, 0.0), axis=1)
    return tl.reshape(tl.broadcast_to(row[:, None, :], (NS, SUB, X.shape[1])), (BT, X.shape[1]))


@triton.jit
def _sub_block(o_t, i):
    """Sub-chunk i's rows, the rows before it, and the log-cumsum's reference row (the last one before it)."""
    return (o_t >= i * SUB) & (o_t < (i + 1) * SUB), o_t < i * SUB, i * SUB - 1


@triton.jit
def _decay(lb, mask, ref, SIGN: tl.constexpr):
    """exp(SIGN (lb - ref)) where mask, else 0: a decay between a token and a reference row it does not precede
    (SIGN 1) or follow (SIGN -1), so <= 1."""
    return tl.where(mask, tl.exp(tl.where(mask, SIGN * (lb - ref), 0.0)), 0.0)


@triton.jit
def _gd_scores(b_q, b_k, lb, eta_t, o_t, BT: tl.constexpr, PREC: tl.constexpr, TRANSPOSED: tl.constexpr):
    """AG[t, j] = sum_c q_tc exp(lb_tc - lb_jc) k_jc eta_j (j <= t; gd: G_c = E_c diag(eta)), or its transpose, by
    the secondary chunking of GLA (Yang et al. 2024): across sub-chunks of SUB rows both factors of
    exp(lb_t - lb_j) = exp(lb_t - lb_r) exp(lb_r - lb_j) are taken against the row r just before t's sub-chunk
    (each <= 1, one dot per sub-chunk); within a sub-chunk, column by column (SUB steps over [BT, BK] blocks)."""
    S = tl.zeros([BT, BT], dtype=tl.float32)
    for i in range(1, BT // SUB):
        rows, before, r = _sub_block(o_t, i)
        ref = _row_select(lb, o_t, r)[None, :]
        Qf = b_q * _decay(lb, rows[:, None], ref, 1)
        Kf = b_k * _decay(lb, before[:, None], ref, -1)
        if TRANSPOSED:
            S += _dot(Kf, tl.trans(Qf), PREC)
        else:
            S += _dot(Qf, tl.trans(Kf), PREC)
    for jj in range(SUB):
        J = (o_t // SUB) * SUB + jj  # row jj of t's sub-chunk
        E = _decay(lb, (o_t >= J)[:, None], _sub_rows(lb, jj, BT), 1)
        d = tl.sum(b_q * E * _sub_rows(b_k, jj, BT), axis=1)  # before eta: d[t] = S[t, J(t)]
        if TRANSPOSED:
            S += tl.where(o_t[:, None] == J[None, :], d[None, :], 0.0)
        else:
            S += tl.where(o_t[None, :] == J[:, None], d[:, None], 0.0)
    if TRANSPOSED:
        return S * eta_t[:, None]
    return S * eta_t[None, :]


@triton.jit
def _gd_pairs(M, X, lb, o_t, BT: tl.constexpr, PREC: tl.constexpr, LATER: tl.constexpr):
    """Strictly causal decayed sums over token pairs, split as in ``_gd_scores`` (the caller adds the pairs t = j,
    whose decay is 1):
        LATER False: Y[t, c] = sum_{j < t} M[t, j] exp(lb_tc - lb_jc) X[j, c]   (each row from earlier tokens);
        LATER True:  Y[j, c] = sum_{t > j} M[j, t] exp(lb_tc - lb_jc) X[t, c]   (from later ones; M is the pairs'
                     matrix transposed, formed directly: no tl.trans of a dot result)."""
    SIGN: tl.constexpr = -1 if LATER else 1  # the sign of lb_out - lb_in in the decay
    Y = tl.zeros([BT, X.shape[1]], dtype=tl.float32)
    for i in range(1, BT // SUB):
        rows, before, r = _sub_block(o_t, i)
        if LATER:
            out_rows, in_rows = before, rows
        else:
            out_rows, in_rows = rows, before
        ref = _row_select(lb, o_t, r)[None, :]
        MX = _dot(tl.where(out_rows[:, None] & in_rows[None, :], M, 0.0), X * _decay(lb, in_rows[:, None], ref, -SIGN),
                  PREC)
        Y += _decay(lb, out_rows[:, None], ref, SIGN) * MX
    for jj in range(SUB):
        J = (o_t // SUB) * SUB + jj  # the other token of the pair: row jj of this row's sub-chunk
        if LATER:
            pair = J > o_t
        else:
            pair = o_t > J
        E = _decay(lb, pair[:, None], _sub_rows(lb, jj, BT), SIGN)
        Y += tl.sum(tl.where(o_t[None, :] == J[:, None], M, 0.0), axis=1)[:, None] * E * _sub_rows(X, jj, BT)
    return Y


@triton.jit
def _end_decay(lb, o_t, L):
    """E_c[L, j] = exp(lb_Lc - lb_jc) for j <= L, else 0: [BT, BK] (gd: GL = E_L diag(eta))."""
    return _decay(lb, (o_t <= L)[:, None], _row_select(lb, o_t, L)[None, :], -1)


@triton.jit
def _program(T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
             BV: tl.constexpr):
    """This program's V-tile i_v (columns o_v) and batch*head, its row / column ranges and masks, the offsets of its
    tokens' gates (p_g), q / k and v rows (p_qk, p_v), and of its columns of the [K, V] state (p_s, s_off, s_ok)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_t, o_k, o_v = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    k_ok, v_ok = o_k < K, o_v < V
    p_g = i_b * T * H + i_h
    return (i_v, i_bh, o_t, o_k, o_v, k_ok, v_ok, p_g, p_g * K, p_g * V, i_bh.to(tl.int64) * K * V,
            o_k[:, None] * V + o_v[None, :], k_ok[:, None] & v_ok[None, :])


@triton.jit
def _given_states(x, y, p_s, s_off, s_ok, HAS_X: tl.constexpr, HAS_Y: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr):
    """A pair of [K, V] states of this program's batch*head (W, S; or their cotangents), zeros where not given."""
    X = tl.zeros([BK, BV], dtype=tl.float32)
    Y = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_X:
        X = tl.load(x + p_s + s_off, mask=s_ok, other=0.0)
    if HAS_Y:
        Y = tl.load(y + p_s + s_off, mask=s_ok, other=0.0)
    return X, Y


@triton.jit
def _channel_fwd_kernel(
    q, k, v, eta, keep, mu, delta, h0, s0, o, hs, ss, ht, st, T, NT_CHUNKS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
    DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, HAS_H0: tl.constexpr, HAS_S0: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (V-tile, batch*head) walks the chunks: stores its columns of every chunk-start state (hs, ss
    [B*H, NT, K, V] fp32), of the outputs o and of the final state (ht, st). The columns of W are independent given
    the gates (R is row-wise in y but for Huber's switch, whose tile is all of V)."""
    _, i_bh, o_t, o_k, o_v, k_ok, v_ok, p_g, p_qk, p_v, p_s, s_off, s_ok = _program(T, H, K, V, BT, BK, BV)
    W, S = _given_states(h0, s0, p_s, s_off, s_ok, HAS_H0, HAS_S0, BK, BV)
    for c in range(NT_CHUNKS):
        p_c = (i_bh.to(tl.int64) * NT_CHUNKS + c) * K * V
        tl.store(hs + p_c + s_off, W, mask=s_ok)
        if MOMENTUM:
            tl.store(ss + p_c + s_off, S, mask=s_ok)
        t_idx, t_ok, L, qk_ok, tv_ok, p_tk, p_tv, b_q, b_k, b_v, b_d, lb, eta_t, lm, m, NT = _chunk_inputs(
            q, k, v, eta, keep, mu, delta, c, T, p_qk, p_v, p_g, o_t, o_k, o_v, k_ok, v_ok, H, K, V, BT, CS, BIAS,
            MOMENTUM, PREC)
        B = tl.exp(lb)
        if DECAYED:
            y = _dot(b_k * B, W, PREC)
        else:
            y = _dot(b_k, W, PREC)
        R = tl.where(t_ok[:, None], bias_rows(y, b_v, b_d, BIAS, P, SMOOTH, EPS), 0.0)
        AG, GL, F = _channel_sums(b_q, b_k, lb, eta_t, lm, m, NT, o_k, o_t, L, K, MOMENTUM, PREC, False)
        b_o = _dot(b_q * B, W, PREC) - _dot(AG, R, PREC)
        W_new = _row_select(B, o_t, L)[:, None] * W - _dot(tl.trans(b_k * GL), R, PREC)
        if MOMENTUM:
            b_o += _dot(b_q * F, S, PREC)
            W_new += _row_select(F, o_t, L)[:, None] * S
            S = _vec_select(m, o_t, L) * S - _dot(tl.trans(b_k * _row_select(NT, o_t, L)[:, None]), R, PREC)
        W = W_new
        tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=tv_ok)
    tl.store(ht + p_s + s_off, W, mask=s_ok)
    if MOMENTUM:
        tl.store(st + p_s + s_off, S, mask=s_ok)


@triton.jit
def _channel_bwd_kernel(
    q, k, v, eta, keep, mu, delta, hs, ss, do, dht, dst, dq, dk, dv, deta, dla, dlm, ddelta, dh0, ds0, T, NT_CHUNKS,
    BTH,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
    DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, HAS_DHT: tl.constexpr, HAS_DST: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (V-tile, batch*head) walks the chunks in reverse from the final state's cotangent (dht, dst):
    per chunk the input gradients dq, dk, dv, d eta, d log alpha ([NV, B, T, H, K]), d log mu, Huber's d delta, and
    the gradient of its start state's columns, which the previous chunk takes as its end state's; the initial state's
    into dh0, ds0. dv and the states' gradients are exact per V-tile; the others are its partial sums over V (every
    one of them is linear in the V columns' contributions; BTH = B*T*H strides their slots), which the host adds."""
    i_v, i_bh, o_t, o_k, o_v, k_ok, v_ok, p_g, p_qk, p_v, p_s, s_off, s_ok = _program(T, H, K, V, BT, BK, BV)
    p_part = i_v.to(tl.int64) * BTH  # V-tile i_v's slot of the partial sums over V ([NV, B, T, H] gates, x K)
    causal = o_t[:, None] >= o_t[None, :]
    causal_t = o_t[:, None] <= o_t[None, :]
    dW, dS = _given_states(dht, dst, p_s, s_off, s_ok, HAS_DHT, HAS_DST, BK, BV)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    for cc in range(NT_CHUNKS):
        c = NT_CHUNKS - 1 - cc
        p_c = (i_bh.to(tl.int64) * NT_CHUNKS + c) * K * V
        W = tl.load(hs + p_c + s_off, mask=s_ok, other=0.0)
        if MOMENTUM:
            S = tl.load(ss + p_c + s_off, mask=s_ok, other=0.0)
        t_idx, t_ok, L, qk_ok, tv_ok, p_tk, p_tv, b_q, b_k, b_v, b_d, lb, eta_t, lm, m, NT = _chunk_inputs(
            q, k, v, eta, keep, mu, delta, c, T, p_qk, p_v, p_g, o_t, o_k, o_v, k_ok, v_ok, H, K, V, BT, CS, BIAS,
            MOMENTUM, PREC)
        at_L = o_t == L
        B = tl.exp(lb)
        kp = b_k
        if DECAYED:
            kp = b_k * B  # the prediction's keys: y = (k . b) W_0 at the decayed point
        y = _dot(kp, W, PREC)
        R = tl.where(t_ok[:, None], bias_rows(y, b_v, b_d, BIAS, P, SMOOTH, EPS), 0.0)
        AGT, GL, F = _channel_sums(b_q, b_k, lb, eta_t, lm, m, NT, o_k, o_t, L, K, MOMENTUM, PREC, True)
        b_do = tl.load(do + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
        nL = _row_select(NT, o_t, L)
        # dR: the read's part -(AG^T dO) and the end states' parts
        dA = -tl.where(causal, _dot(b_do, tl.trans(R), PREC), 0.0)  # d AG
        dAT = -tl.where(causal_t, _dot(R, tl.trans(b_do), PREC), 0.0)  # its transpose, formed directly
        dR = -_dot(b_k * GL, dW, PREC) - _dot(AGT, b_do, PREC)
        if MOMENTUM:
            dR -= _dot(b_k * nL[:, None], dS, PREC)
        dR = tl.where(t_ok[:, None], dR, 0.0)
        dY, dV, dd = bias_rows_bwd(y, b_v, b_d, dR, BIAS, P, SMOOTH, EPS)
        dYW = _dot(dY, tl.trans(W), PREC)
        dOW = _dot(b_do, tl.trans(W), PREC)
        RdW = _dot(R, tl.trans(dW), PREC)
        b_dq = B * dOW
        dB = b_q * dOW
        if DECAYED:
            b_dk = B * dYW - GL * RdW
            dB += b_k * dYW
        else:
            b_dk = dYW - GL * RdW
        dGL = -b_k * RdW
        dbL = tl.sum(W * dW, axis=1)
        dF = tl.zeros([BT, BK], dtype=tl.float32)
        dfL = dbL * 0.0
        dnL = tl.zeros([BT], dtype=tl.float32)
        dmL = 0.0
        if MOMENTUM:
            dOS = _dot(b_do, tl.trans(S), PREC)
            RdS = _dot(R, tl.trans(dS), PREC)
            b_dq += F * dOS
            b_dk -= nL[:, None] * RdS
            dF = b_q * dOS
            dfL = tl.sum(S * dW, axis=1)
            dnL = -tl.sum(b_k * RdS, axis=1)
            dmL = tl.sum(tl.sum(S * dS, axis=1), axis=0)
        # dq, dk through AG and the gate gradients. gd (G_c = E_c diag(eta)), by the secondary chunking of
        # _gd_scores: dq_c = (dA diag(eta) o E) k, dk_c = eta (dA o E)^T q per channel, and the gate chains of
        # common.gate_grads summed in closed form: d eta_j = sum_c k_jc X_jc + (dGL . E_L)_j with dk_c = eta X;
        # d lb = q . dq_c - k . dk_c + (the end row's dGL . GL terms) + dbeta . b, then d log alpha its reverse
        # cumsum. Momentum (G_c = E_c N^T): channel by channel through common.gate_grads.
        if MOMENTUM:
            dq_c = tl.zeros([BT, BK], dtype=tl.float32)  # the channel loop's parts of dq, dk and d log alpha
            dk_c = tl.zeros([BT, BK], dtype=tl.float32)
            DLA = tl.zeros([BT, BK], dtype=tl.float32)
            d_eta = tl.zeros([BT], dtype=tl.float32)
            dlm_ = tl.zeros([BT], dtype=tl.float32)
            for ch in range(K):
                lb_c, E, G = _channel_gate(lb, eta_t, NT, o_k, o_t, ch, MOMENTUM, PREC)
                ET, Nm, GT = gate_coeffs_t(eta_t, lb_c, lm, o_t, MOMENTUM, PREC)
                q_c, k_c = _col(b_q, o_k, ch), _col(b_k, o_k, ch)
                at_c = o_k[None, :] == ch
                dq_c += tl.where(at_c, tl.sum(dA * G * k_c[None, :], axis=1)[:, None], 0.0)
                dk_c += tl.where(at_c, tl.sum(dAT * GT * q_c[None, :], axis=1)[:, None], 0.0)
                dG = dA * q_c[:, None] * k_c[None, :] + tl.where(at_L[:, None], _col(dGL, o_k, ch)[None, :], 0.0)
                dbeta = _col(dB, o_k, ch) + tl.where(at_L, _vec_select(dbL, o_k, ch), 0.0)
                df = _col(dF, o_k, ch) + tl.where(at_L, _vec_select(dfL, o_k, ch), 0.0)
                de, dlb, dlm_ch = gate_grads(dG, dbeta, df, 0.0, tl.zeros([BT], dtype=tl.float32), eta_t, lb_c,
                                             tl.exp(lb_c), E, lm, m, ET, Nm, at_L, o_t, MOMENTUM, PREC)
                d_eta += de
                dlm_ += dlm_ch
                DLA += tl.where(at_c, tl.cumsum(dlb, axis=0, reverse=True)[:, None], 0.0)
        else:
            # j < t parts, then the diagonal (decay 1), which enters d lb's row and column sums alike and cancels
            Yo = _gd_pairs(dA * eta_t[None, :], b_k, lb, o_t, BT, PREC, False)
            Zo = _gd_pairs(dAT, b_q, lb, o_t, BT, PREC, True)
            dA_tt = tl.sum(tl.where(o_t[:, None] == o_t[None, :], dA, 0.0), axis=1)
            X = Zo + dA_tt[:, None] * b_q
            dq_c = Yo + (dA_tt * eta_t)[:, None] * b_k
            dk_c = eta_t[:, None] * X
            EL = _end_decay(lb, o_t, L)  # (GL = EL eta, from _channel_sums)
            dGG = dGL * GL
            d_eta = tl.sum(b_k * X + dGL * EL, axis=1)
            dlb = b_q * Yo - b_k * eta_t[:, None] * Zo - dGG + tl.where(at_L[:, None], tl.sum(dGG, axis=0), 0.0)
            dlb += (dB + tl.where(at_L[:, None], dbL[None, :], 0.0)) * B
            DLA = tl.cumsum(dlb, axis=0, reverse=True)
        if MOMENTUM:  # m_L and n_L (the S path, shared by the channels): once (dG = 0, so E, ET and Nm drop out)
            zero = tl.zeros([BT, BT], dtype=tl.float32)
            de, _, dlm_ch = gate_grads(zero, dnL * 0.0, dnL * 0.0, dmL, dnL, eta_t, dnL * 0.0, dnL * 0.0 + 1.0, zero,
                                       lm, m, zero, zero, at_L, o_t, MOMENTUM, PREC)
            d_eta += de
            dlm_ += dlm_ch
            tl.store(dlm + p_part + p_g + t_idx * H, tl.cumsum(dlm_, axis=0, reverse=True), mask=t_ok)
        tl.store(dq + p_part * K + p_tk, b_dq + dq_c, mask=qk_ok)
        tl.store(dk + p_part * K + p_tk, b_dk + dk_c, mask=qk_ok)
        tl.store(dla + p_part * K + p_tk, DLA, mask=qk_ok)
        tl.store(dv + p_tv, dV.to(dv.dtype.element_ty), mask=tv_ok)
        tl.store(deta + p_part + p_g + t_idx * H, d_eta, mask=t_ok)
        if BIAS == 3:
            tl.store(ddelta + p_g + t_idx * H, dd, mask=t_ok)
        # the start state's gradient: the end state's through diag(b_L), diag(f_L), m_L, the read's and R's
        dW_start = _row_select(B, o_t, L)[:, None] * dW + _dot(tl.trans(b_q * B), b_do, PREC) + _dot(
            tl.trans(kp), dY, PREC)
        if MOMENTUM:
            dS = _row_select(F, o_t, L)[:, None] * dW + _vec_select(m, o_t, L) * dS + _dot(tl.trans(b_q * F), b_do,
                                                                                         PREC)
        dW = dW_start
    tl.store(dh0 + p_s + s_off, dW, mask=s_ok)
    if MOMENTUM:
        tl.store(ds0 + p_s + s_off, dS, mask=s_ok)


# ------------------------------------------------------------------------------------------------ launch + autograd


def _launch(kernel, grid: tuple[int, int], *args, **kw) -> None:
    """``kernel[grid]`` (V-tiles x batch*head) with ``MIRAS_KERNEL_CHANNEL_CONFIG`` on GPU (warps,stages; default
    8,1: a V-tile's columns of the state, their gradient and the [BT, BT] blocks live in one program); the
    interpreter takes no launch options."""
    config = {} if interpreting() else launch_config("MIRAS_KERNEL_CHANNEL_CONFIG", "8,1")
    kernel[grid](*args, **kw, **config)


def _block_v(cfg: RuleConfig, V: int) -> int:
    """The V-tile: ``MIRAS_KERNEL_CHANNEL_BV`` (a power of two >= 16), else 64 (at D=128, two programs per batch*head,
    each with half the state); all of V for Huber, whose switch needs the row norm over V."""
    tile, whole = env_tile("MIRAS_KERNEL_CHANNEL_BV") or 64, pow2_tile(V)
    return whole if cfg.bias == 3 else min(tile, whole)


def _constants(cfg: RuleConfig, q: torch.Tensor, v: torch.Tensor) -> dict:
    B, T, H, K = q.shape
    V = v.shape[-1]
    return dict(H=H, K=K, V=V, BT=chunk_block(cfg.chunk), CS=cfg.chunk, BK=pow2_tile(K), BV=_block_v(cfg, V),
                BIAS=cfg.bias, P=cfg.p, SMOOTH=cfg.smoothing, EPS=cfg.eps, DECAYED=cfg.decayed,
                MOMENTUM=cfg.momentum, PREC=dot_prec(q))


def channel_scan_fwd(cfg: RuleConfig, q, k, v, eta, keep, mu, delta, h0, s0):
    """Forward: (o, W_T, S_T or None, chunk-start W states, chunk-start S states or None). keep: [B, T, H, K]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, cfg.chunk)
    f32 = dict(device=q.device, dtype=torch.float32)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    hs = torch.empty(B * H, NT, K, V, **f32)
    ss = torch.empty_like(hs) if cfg.momentum else hs
    ht = torch.empty(B, H, K, V, **f32)
    st = torch.empty_like(ht) if cfg.momentum else ht
    kw = _constants(cfg, q, v)
    _launch(_channel_fwd_kernel, (triton.cdiv(V, kw["BV"]), B * H), q, k, v, eta, keep,
            mu if mu is not None else eta, delta if delta is not None else eta, h0 if h0 is not None else ht,
            s0 if s0 is not None else ht, o, hs, ss, ht, st, T, NT, **kw, HAS_H0=h0 is not None, HAS_S0=s0 is not None)
    return o, ht, (st if cfg.momentum else None), hs, (ss if cfg.momentum else None)


def channel_scan_bwd(cfg: RuleConfig, q, k, v, eta, keep, mu, delta, hs, ss, do, dht, dst):
    """Backward: gradients of (q, k, v, eta, keep, mu, delta, W_0, S_0) (None where absent)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, cfg.chunk)
    kw = _constants(cfg, q, v)
    NV = triton.cdiv(V, kw["BV"])
    f32 = dict(device=q.device, dtype=torch.float32)
    dq, dk, dla = (torch.empty(NV, B, T, H, K, **f32) for _ in range(3))  # (partial sums over V-tiles)
    deta = torch.empty(NV, B, T, H, **f32)
    dlm = torch.empty(NV, B, T, H, **f32) if cfg.momentum else deta
    dv = torch.empty(B, T, H, V, device=q.device, dtype=v.dtype)
    ddelta = torch.empty(B, T, H, **f32) if cfg.bias == 3 else deta  # (Huber: one V-tile)
    dh0 = torch.empty(B, H, K, V, **f32)
    ds0 = torch.empty_like(dh0) if cfg.momentum else dh0
    _launch(_channel_bwd_kernel, (NV, B * H), q, k, v, eta, keep, mu if mu is not None else eta,
            delta if delta is not None else eta, hs, ss if ss is not None else hs, do,
            dht if dht is not None else dh0, dst if dst is not None else dh0,
            dq, dk, dv, deta, dla, dlm, ddelta, dh0, ds0, T, NT, B * T * H, **kw,
            HAS_DHT=dht is not None, HAS_DST=dst is not None)
    return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv, deta.sum(0), dla.sum(0) / keep,
            dlm.sum(0) / mu if cfg.momentum else None, ddelta if cfg.bias == 3 else None, dh0,
            ds0 if cfg.momentum else None)
