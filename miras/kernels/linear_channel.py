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
Launches (``channel_split``, the default): one program per (V-tile, batch*head) walks the chunks with its columns
of the [K, V] state on chip for the states alone, which need only the end row of each chunk's coefficients
(``_end_row``: GL = NT^T E_L, f_L = E_L^T m, a [BT, K] block); then one launch over (V-tiles, batch*heads, chunks)
forms the outputs of every chunk at once from its start state. Backward: the chunk-parallel reads AG^T dO and, with
momentum, (q . f)^T dO (``_channel_bwd_reads_kernel``), the walk of the state gradients in reverse
(``_channel_bwd_walk_kernel``), then the input gradients of every chunk at once from each chunk's end-state gradient
(``_channel_bwd_chunk``). The [BT, BT] work (AG; with momentum, the channel loop) thus runs in parallel over the
chunks, off the sequential walks. ``MIRAS_KERNEL_CHANNEL_SPLIT=0``: one walk does everything, chunk after chunk
(MODE 0). Chunk-start states are kept from the forward in fp32; the columns are independent given the gates, and
the gradients that sum over V (dq, dk and the gates') are partial sums per V-tile that the host adds.
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
from miras.kernels.settings import env_switch, env_tile, launch_config


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
def _channel_sums(b_q, b_k, lb, eta_t, lm, m, NT, o_k, o_t, K: tl.constexpr, MOMENTUM: tl.constexpr,
                  PREC: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The chunk's channel-summed coefficients: AG [BT, BT] (causal; with TRANSPOSED its transpose AG^T, built
    directly: no tl.trans of dot results, the Hopper hazard of fla #640) and f [BT, BK] (f[t, c] =
    sum_{r<=t} E_c[t, r] m_r; 0 for gd). gd: ``_gd_scores``; momentum: channel by channel, from each channel's G_c
    (G_c^T from ``common.gate_coeffs_t``). The end row GL comes from ``_end_row``."""
    BT: tl.constexpr = o_t.shape[0]
    F = tl.zeros([BT, o_k.shape[0]], dtype=tl.float32)
    if MOMENTUM:
        AG = tl.zeros([BT, BT], dtype=tl.float32)
        for c in range(K):
            lb_c, E, G = _channel_gate(lb, eta_t, NT, o_k, o_t, c, MOMENTUM, PREC)
            if TRANSPOSED:
                GT = gate_coeffs_t(eta_t, lb_c, lm, o_t, MOMENTUM, PREC)[2]
                AG += (_col(b_k, o_k, c)[:, None] * _col(b_q, o_k, c)[None, :]) * GT
            else:
                AG += (_col(b_q, o_k, c)[:, None] * _col(b_k, o_k, c)[None, :]) * G
            F += tl.where(o_k[None, :] == c, tl.sum(E * m[None, :], axis=1)[:, None], 0.0)
    else:  # G_c = E_c diag(eta): no loop over the channels
        AG = _gd_scores(b_q, b_k, lb, eta_t, o_t, BT, PREC, TRANSPOSED)
    return AG, F


SUB = tl.constexpr(16)  # rows of a sub-chunk in the gd path's secondary chunking (GLA)


@triton.jit
def _sub_rows(X, jj, BT: tl.constexpr):
    """[BT, N] -> [BT, N] whose row t is X's row jj of t's sub-chunk (row SUB * (t // SUB) + jj)."""
    J = (tl.arange(0, BT) // SUB) * SUB + jj
    return tl.gather(X, tl.broadcast_to(J[:, None], (BT, X.shape[1])), 0)


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
        Y += tl.gather(M, J[:, None], 1) * E * _sub_rows(X, jj, BT)  # M[t, J(t)] * ...
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
def _chunk_prediction(b_k, b_v, b_d, lb, W, t_ok, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr,
                      EPS: tl.constexpr, DECAYED: tl.constexpr, PREC: tl.constexpr):
    """b = exp(lb), the prediction's keys kp (k . b at the decayed point, else k), y = kp W_0 and R = dl/dy(y; v) (0
    on padding)."""
    B = tl.exp(lb)
    kp = b_k
    if DECAYED:
        kp = b_k * B
    y = _dot(kp, W, PREC)
    R = tl.where(t_ok[:, None], bias_rows(y, b_v, b_d, BIAS, P, SMOOTH, EPS), 0.0)
    return B, kp, y, R


@triton.jit
def _chunk_read(b_q, B, F, W, S, AG, R, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """o = (q . b) W_0 + (q . f) S_0 - AG R."""
    b_o = _dot(b_q * B, W, PREC) - _dot(AG, R, PREC)
    if MOMENTUM:
        b_o += _dot(b_q * F, S, PREC)
    return b_o


@triton.jit
def _end_row(lb, eta_t, NT, m, o_t, L, MOMENTUM: tl.constexpr, PREC: tl.constexpr, TRANSPOSED: tl.constexpr):
    """What the end state needs of the chunk's coefficients, without a [BT, BT] block per channel: E_L [BT, BK]
    (E_L[r, c] = E_c[L, r], ``_end_decay``), GL [BT, BK] (GL[j, c] = G_c[L, j] = sum_r E_c[L, r] NT[r, j], i.e.
    NT^T E_L; E_L diag(eta) for gd), with TRANSPOSED its transpose GL^T = E_L^T NT formed directly (the forward's
    update takes it transposed: no tl.trans of a dot result, fla #640), and f_L [BK] (f_L[c] = sum_r E_c[L, r] m_r;
    0 for gd)."""
    EL = _end_decay(lb, o_t, L)
    if MOMENTUM:
        if TRANSPOSED:
            GL = _dot(tl.trans(EL), NT, PREC)
        else:
            GL = _dot(tl.trans(NT), EL, PREC)
        fL = tl.sum(EL * m[:, None], axis=0)
    else:
        GL = EL * eta_t[:, None]
        if TRANSPOSED:
            GL = tl.trans(GL)
        fL = tl.zeros([EL.shape[1]], dtype=tl.float32)
    return EL, GL, fL


@triton.jit
def _end_state(W, S, B, GLT, fL, b_k, R, NT, m, o_t, L, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """The chunk's end state: W_L = diag(b_L) W_0 + diag(f_L) S_0 - (k . GL)^T R, S_L = m_L S_0 - (k . n_L)^T R
    (GLT = GL^T from ``_end_row``)."""
    W_end = _row_select(B, o_t, L)[:, None] * W - _dot(tl.trans(b_k) * GLT, R, PREC)
    if MOMENTUM:
        W_end += fL[:, None] * S
        S = _vec_select(m, o_t, L) * S - _dot(tl.trans(b_k * _row_select(NT, o_t, L)[:, None]), R, PREC)
    return W_end, S


@triton.jit
def _chunk_slot(i_bh, c, NT_CHUNKS, K: tl.constexpr, V: tl.constexpr):
    """Offset of chunk c's slot in [B*H, NT, K, V] (hs, ss, their gradients dhs, dss, and qf)."""
    return (i_bh.to(tl.int64) * NT_CHUNKS + c) * K * V


@triton.jit
def _channel_fwd_kernel(
    q, k, v, eta, keep, mu, delta, h0, s0, o, hs, ss, ht, st, T, NT_CHUNKS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
    DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, HAS_H0: tl.constexpr, HAS_S0: tl.constexpr, PREC: tl.constexpr,
    MODE: tl.constexpr,
):
    """MODE 0: one program per (V-tile, batch*head) walks the chunks: stores its columns of every chunk-start state
    (hs, ss [B*H, NT, K, V] fp32), of the outputs o and of the final state (ht, st). MODE 1 (``channel_split``): the
    same walk for the states alone, whose end rows need no [BT, BT] block (``_end_row``); MODE 2: program (V-tile,
    batch*head, chunk c) the outputs of chunk c from its start state in hs, ss, every chunk at once. The columns of W
    are independent given the gates (R is row-wise in y but for Huber's switch, whose tile is all of V)."""
    _, i_bh, o_t, o_k, o_v, k_ok, v_ok, p_g, p_qk, p_v, p_s, s_off, s_ok = _program(T, H, K, V, BT, BK, BV)
    if MODE == 2:
        c = tl.program_id(2)
        W, S = _given_states(hs, ss, _chunk_slot(i_bh, c, NT_CHUNKS, K, V), s_off, s_ok, True, MOMENTUM, BK, BV)
        t_idx, t_ok, L, qk_ok, tv_ok, p_tk, p_tv, b_q, b_k, b_v, b_d, lb, eta_t, lm, m, NT = _chunk_inputs(
            q, k, v, eta, keep, mu, delta, c, T, p_qk, p_v, p_g, o_t, o_k, o_v, k_ok, v_ok, H, K, V, BT, CS, BIAS,
            MOMENTUM, PREC)
        B, _, _, R = _chunk_prediction(b_k, b_v, b_d, lb, W, t_ok, BIAS, P, SMOOTH, EPS, DECAYED, PREC)
        AG, F = _channel_sums(b_q, b_k, lb, eta_t, lm, m, NT, o_k, o_t, K, MOMENTUM, PREC, False)
        tl.store(o + p_tv, _chunk_read(b_q, B, F, W, S, AG, R, MOMENTUM, PREC).to(o.dtype.element_ty), mask=tv_ok)
    else:
        W, S = _given_states(h0, s0, p_s, s_off, s_ok, HAS_H0, HAS_S0, BK, BV)
        for c in range(NT_CHUNKS):
            p_c = _chunk_slot(i_bh, c, NT_CHUNKS, K, V)
            tl.store(hs + p_c + s_off, W, mask=s_ok)
            if MOMENTUM:
                tl.store(ss + p_c + s_off, S, mask=s_ok)
            t_idx, t_ok, L, qk_ok, tv_ok, p_tk, p_tv, b_q, b_k, b_v, b_d, lb, eta_t, lm, m, NT = _chunk_inputs(
                q, k, v, eta, keep, mu, delta, c, T, p_qk, p_v, p_g, o_t, o_k, o_v, k_ok, v_ok, H, K, V, BT, CS, BIAS,
                MOMENTUM, PREC)
            B, kp, y, R = _chunk_prediction(b_k, b_v, b_d, lb, W, t_ok, BIAS, P, SMOOTH, EPS, DECAYED, PREC)
            if MODE == 0:
                AG, F = _channel_sums(b_q, b_k, lb, eta_t, lm, m, NT, o_k, o_t, K, MOMENTUM, PREC, False)
                tl.store(o + p_tv, _chunk_read(b_q, B, F, W, S, AG, R, MOMENTUM, PREC).to(o.dtype.element_ty),
                         mask=tv_ok)
            EL, GLT, fL = _end_row(lb, eta_t, NT, m, o_t, L, MOMENTUM, PREC, True)
            W, S = _end_state(W, S, B, GLT, fL, b_k, R, NT, m, o_t, L, MOMENTUM, PREC)
        tl.store(ht + p_s + s_off, W, mask=s_ok)
        if MOMENTUM:
            tl.store(st + p_s + s_off, S, mask=s_ok)


@triton.jit
def _channel_bwd_chunk(q, k, v, eta, keep, mu, delta, do, dq, dk, dv, deta, dla, dlm, ddelta, W, S, dW, dS, c, T, p_qk,
                       p_v, p_g, p_part, o_t, o_k, o_v, k_ok, v_ok, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr,
                       SMOOTH: tl.constexpr, EPS: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr,
                       PREC: tl.constexpr):
    """Chunk c of the backward, from its start state (W, S) and its end state's gradient (dW, dS): stores its input
    gradients dq, dk, dv, d eta, d log alpha, d log mu, Huber's d delta (``_channel_bwd_kernel``) and returns the
    start state's gradient (dW_0, dS_0)."""
    causal = o_t[:, None] >= o_t[None, :]
    causal_t = o_t[:, None] <= o_t[None, :]
    t_idx, t_ok, L, qk_ok, tv_ok, p_tk, p_tv, b_q, b_k, b_v, b_d, lb, eta_t, lm, m, NT = _chunk_inputs(
        q, k, v, eta, keep, mu, delta, c, T, p_qk, p_v, p_g, o_t, o_k, o_v, k_ok, v_ok, H, K, V, BT, CS, BIAS,
        MOMENTUM, PREC)
    at_L = o_t == L
    B, kp, y, R = _chunk_prediction(b_k, b_v, b_d, lb, W, t_ok, BIAS, P, SMOOTH, EPS, DECAYED, PREC)
    AGT, F = _channel_sums(b_q, b_k, lb, eta_t, lm, m, NT, o_k, o_t, K, MOMENTUM, PREC, True)
    EL, GL, fL = _end_row(lb, eta_t, NT, m, o_t, L, MOMENTUM, PREC, False)
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
        dS = fL[:, None] * dW + _vec_select(m, o_t, L) * dS + _dot(tl.trans(b_q * F), b_do, PREC)
    return dW_start, dS


@triton.jit
def _channel_bwd_kernel(
    q, k, v, eta, keep, mu, delta, hs, ss, do, dht, dst, dhs, dss, dq, dk, dv, deta, dla, dlm, ddelta, dh0, ds0, T,
    NT_CHUNKS, BTH,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
    DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, HAS_DHT: tl.constexpr, HAS_DST: tl.constexpr, PREC: tl.constexpr,
    MODE: tl.constexpr,
):
    """MODE 0: one program per (V-tile, batch*head) walks the chunks in reverse from the final state's cotangent
    (dht, dst): per chunk the input gradients dq, dk, dv, d eta, d log alpha ([NV, B, T, H, K]), d log mu, Huber's
    d delta (``_channel_bwd_chunk``), and the gradient of its start state's columns, which the previous chunk takes
    as its end state's; the initial state's into dh0, ds0. MODE 2 (``channel_split``): program (V-tile, batch*head,
    chunk c) the input gradients of chunk c, every chunk at once, from its end state's gradient in dhs, dss
    (``_channel_bwd_walk_kernel``). dv and the states' gradients are exact per V-tile; the others are its partial
    sums over V (every one of them is linear in the V columns' contributions; BTH = B*T*H strides their slots),
    which the host adds."""
    i_v, i_bh, o_t, o_k, o_v, k_ok, v_ok, p_g, p_qk, p_v, p_s, s_off, s_ok = _program(T, H, K, V, BT, BK, BV)
    p_part = i_v.to(tl.int64) * BTH  # V-tile i_v's slot of the partial sums over V ([NV, B, T, H] gates, x K)
    if MODE == 2:
        c = tl.program_id(2)
        p_c = _chunk_slot(i_bh, c, NT_CHUNKS, K, V)
        W, S = _given_states(hs, ss, p_c, s_off, s_ok, True, MOMENTUM, BK, BV)
        dW, dS = _given_states(dhs, dss, p_c, s_off, s_ok, True, MOMENTUM, BK, BV)
        _channel_bwd_chunk(q, k, v, eta, keep, mu, delta, do, dq, dk, dv, deta, dla, dlm, ddelta, W, S, dW, dS, c, T,
                           p_qk, p_v, p_g, p_part, o_t, o_k, o_v, k_ok, v_ok, H, K, V, BT, CS, BK, BIAS, P, SMOOTH,
                           EPS, DECAYED, MOMENTUM, PREC)  # (its start-state gradients: dead code here)
    else:
        dW, dS = _given_states(dht, dst, p_s, s_off, s_ok, HAS_DHT, HAS_DST, BK, BV)
        for cc in range(NT_CHUNKS):
            c = NT_CHUNKS - 1 - cc
            W, S = _given_states(hs, ss, _chunk_slot(i_bh, c, NT_CHUNKS, K, V), s_off, s_ok, True, MOMENTUM, BK, BV)
            dW, dS = _channel_bwd_chunk(q, k, v, eta, keep, mu, delta, do, dq, dk, dv, deta, dla, dlm, ddelta, W, S,
                                        dW, dS, c, T, p_qk, p_v, p_g, p_part, o_t, o_k, o_v, k_ok, v_ok, H, K, V, BT,
                                        CS, BK, BIAS, P, SMOOTH, EPS, DECAYED, MOMENTUM, PREC)
        tl.store(dh0 + p_s + s_off, dW, mask=s_ok)
        if MOMENTUM:
            tl.store(ds0 + p_s + s_off, dS, mask=s_ok)


@triton.jit
def _channel_bwd_reads_kernel(
    q, k, v, eta, keep, mu, delta, do, u, qf, T, NT_CHUNKS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr,
):
    """Before the backward's walk (``channel_split``), program (V-tile, batch*head, chunk c), every chunk at once:
    what the walk needs of chunk c that no state gradient enters, from its [BT, BT] blocks (``_channel_sums``):
    U = AG^T dO into u ([B, T, H, V] fp32, the rows of o; for a bias whose R depends on y) and, with momentum,
    (q . f)^T dO into qf (slot c of [B*H, NT, K, V])."""
    _, i_bh, o_t, o_k, o_v, k_ok, v_ok, p_g, p_qk, p_v, p_s, s_off, s_ok = _program(T, H, K, V, BT, BK, BV)
    c = tl.program_id(2)
    t_idx, t_ok, L, qk_ok, tv_ok, p_tk, p_tv, b_q, b_k, b_v, b_d, lb, eta_t, lm, m, NT = _chunk_inputs(
        q, k, v, eta, keep, mu, delta, c, T, p_qk, p_v, p_g, o_t, o_k, o_v, k_ok, v_ok, H, K, V, BT, CS, BIAS,
        MOMENTUM, PREC)
    AGT, F = _channel_sums(b_q, b_k, lb, eta_t, lm, m, NT, o_k, o_t, K, MOMENTUM, PREC, True)
    b_do = tl.load(do + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
    if BIAS != 0:
        tl.store(u + p_tv, _dot(AGT, b_do, PREC), mask=tv_ok)
    if MOMENTUM:
        tl.store(qf + _chunk_slot(i_bh, c, NT_CHUNKS, K, V) + s_off, _dot(tl.trans(b_q * F), b_do, PREC), mask=s_ok)


@triton.jit
def _channel_bwd_walk_kernel(
    q, k, v, eta, keep, mu, delta, hs, do, u, qf, dht, dst, dhs, dss, dh0, ds0, T, NT_CHUNKS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
    DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, HAS_DHT: tl.constexpr, HAS_DST: tl.constexpr, PREC: tl.constexpr,
):
    """The backward's walk of the state gradients alone (``channel_split``): one program per (V-tile, batch*head)
    from the final state's cotangent (dht, dst), in reverse. It stores each chunk's end-state gradient (dhs, dss,
    slot c) and forms its start state's,
        dW_0 = diag(b_L) dW + (q . b)^T dO + kp^T dY,   dS_0 = diag(f_L) dW + m_L dS + (q . f)^T dO,
    dY the VJP of R at dR = -(k . GL) dW - (k . n_L) dS - AG^T dO (no dY for the dot bias, whose R does not depend
    on y), with GL and f_L from ``_end_row`` and AG^T dO, (q . f)^T dO from ``_channel_bwd_reads_kernel``: no
    [BT, BT] block. The initial state's gradient into dh0, ds0."""
    _, i_bh, o_t, o_k, o_v, k_ok, v_ok, p_g, p_qk, p_v, p_s, s_off, s_ok = _program(T, H, K, V, BT, BK, BV)
    dW, dS = _given_states(dht, dst, p_s, s_off, s_ok, HAS_DHT, HAS_DST, BK, BV)
    for cc in range(NT_CHUNKS):
        c = NT_CHUNKS - 1 - cc
        p_c = _chunk_slot(i_bh, c, NT_CHUNKS, K, V)
        tl.store(dhs + p_c + s_off, dW, mask=s_ok)
        if MOMENTUM:
            tl.store(dss + p_c + s_off, dS, mask=s_ok)
        W = tl.load(hs + p_c + s_off, mask=s_ok, other=0.0)
        t_idx, t_ok, L, qk_ok, tv_ok, p_tk, p_tv, b_q, b_k, b_v, b_d, lb, eta_t, lm, m, NT = _chunk_inputs(
            q, k, v, eta, keep, mu, delta, c, T, p_qk, p_v, p_g, o_t, o_k, o_v, k_ok, v_ok, H, K, V, BT, CS, BIAS,
            MOMENTUM, PREC)
        B, kp, y, R = _chunk_prediction(b_k, b_v, b_d, lb, W, t_ok, BIAS, P, SMOOTH, EPS, DECAYED, PREC)
        EL, GL, fL = _end_row(lb, eta_t, NT, m, o_t, L, MOMENTUM, PREC, False)
        b_do = tl.load(do + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
        dW_start = _row_select(B, o_t, L)[:, None] * dW + _dot(tl.trans(b_q * B), b_do, PREC)
        if BIAS != 0:
            dR = -_dot(b_k * GL, dW, PREC) - tl.load(u + p_tv, mask=tv_ok, other=0.0)
            if MOMENTUM:
                dR -= _dot(b_k * _row_select(NT, o_t, L)[:, None], dS, PREC)
            dY, dV, dd = bias_rows_bwd(y, b_v, b_d, tl.where(t_ok[:, None], dR, 0.0), BIAS, P, SMOOTH, EPS)
            dW_start += _dot(tl.trans(kp), dY, PREC)
        if MOMENTUM:
            dS = fL[:, None] * dW + _vec_select(m, o_t, L) * dS + tl.load(qf + p_c + s_off, mask=s_ok, other=0.0)
        dW = dW_start
    tl.store(dh0 + p_s + s_off, dW, mask=s_ok)
    if MOMENTUM:
        tl.store(ds0 + p_s + s_off, dS, mask=s_ok)


# ------------------------------------------------------------------------------------------------ launch + autograd


def _launch(kernel, grid: tuple[int, ...], *args, **kw) -> None:
    """``kernel[grid]`` (V-tiles x batch*head [x chunks]) with ``MIRAS_KERNEL_CHANNEL_CONFIG`` on GPU (warps,stages;
    default 8,1: a V-tile's columns of the state, their gradient and the [BT, BT] blocks live in one program); the
    interpreter takes no launch options."""
    config = {} if interpreting() else launch_config("MIRAS_KERNEL_CHANNEL_CONFIG", "8,1")
    kernel[grid](*args, **kw, **config)


def channel_split() -> bool:
    """``MIRAS_KERNEL_CHANNEL_SPLIT`` (default on): whether the kernels walk the chunks for the states alone and form
    everything else for every chunk at once, as the head-gate kernels do. Forward: the walk (MODE 1) needs of each
    chunk only its end row of coefficients (``_end_row``: a [BT, K] block, no [BT, BT] block per channel or
    sub-chunk), then one launch over (V-tiles, batch*heads, chunks) forms the outputs (MODE 2). Backward: one launch
    over every chunk forms AG^T dO and, with momentum, (q . f)^T dO (``_channel_bwd_reads_kernel``), the walk carries
    the state gradients with those (``_channel_bwd_walk_kernel``), and one launch over every chunk forms the input
    gradients from each chunk's end-state gradient (MODE 2). The chunk's [BT, BT] work (AG, and with momentum the
    channel loop) thus leaves the sequential walk, at the cost of forming AG twice in the backward and keeping every
    chunk's end-state gradient ([B*H, NT, K, V] fp32, as the start states). "0": one program per V-tile and
    batch*head does all of it, chunk after chunk (MODE 0). The same sums either way, in another order."""
    return env_switch("MIRAS_KERNEL_CHANNEL_SPLIT", True)


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


def _only(kernel, kw: dict) -> dict:
    """The constants of ``kw`` that ``kernel`` takes."""
    return {n: val for n, val in kw.items() if n in kernel.arg_names}


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
    grid = (triton.cdiv(V, kw["BV"]), B * H)
    args = (q, k, v, eta, keep, mu if mu is not None else eta, delta if delta is not None else eta,
            h0 if h0 is not None else ht, s0 if s0 is not None else ht, o, hs, ss, ht, st, T, NT)
    kw.update(HAS_H0=h0 is not None, HAS_S0=s0 is not None)
    if channel_split():
        _launch(_channel_fwd_kernel, grid, *args, **kw, MODE=1)
        _launch(_channel_fwd_kernel, (*grid, NT), *args, **kw, MODE=2)
    else:
        _launch(_channel_fwd_kernel, grid, *args, **kw, MODE=0)
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
    mu, delta = mu if mu is not None else eta, delta if delta is not None else eta
    ss = ss if ss is not None else hs
    dht, dst = dht if dht is not None else dh0, dst if dst is not None else dh0
    grid = (NV, B * H)
    kw.update(HAS_DHT=dht is not dh0, HAS_DST=dst is not dh0)
    inputs = (q, k, v, eta, keep, mu, delta)
    grads = (dq, dk, dv, deta, dla, dlm, ddelta, dh0, ds0, T, NT, B * T * H)
    if channel_split():
        dhs = torch.empty_like(hs)  # every chunk's end-state gradient
        dss = torch.empty_like(hs) if cfg.momentum else dhs
        u = torch.empty(B, T, H, V, **f32) if cfg.bias != 0 else dhs  # AG^T dO
        qf = torch.empty_like(hs) if cfg.momentum else dhs  # (q . f)^T dO
        if cfg.bias != 0 or cfg.momentum:
            _launch(_channel_bwd_reads_kernel, (*grid, NT), *inputs, do, u, qf, T, NT,
                    **_only(_channel_bwd_reads_kernel, kw))
        _launch(_channel_bwd_walk_kernel, grid, *inputs, hs, do, u, qf, dht, dst, dhs, dss, dh0, ds0, T, NT,
                **_only(_channel_bwd_walk_kernel, kw))
        _launch(_channel_bwd_kernel, (*grid, NT), *inputs, hs, ss, do, dht, dst, dhs, dss, *grads, **kw, MODE=2)
    else:
        _launch(_channel_bwd_kernel, grid, *inputs, hs, ss, do, dht, dst, dh0, dh0, *grads, **kw, MODE=0)
    return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv, deta.sum(0), dla.sum(0) / keep,
            dlm.sum(0) / mu if cfg.momentum else None, ddelta if cfg.bias == 3 else None, dh0,
            ds0 if cfg.momentum else None)
