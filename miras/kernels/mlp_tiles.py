"""Triton kernels of the 2-layer MLP memory with the hidden dimension split across programs (the default layout).

Same memory, gradients and dual-form reads as miras/kernels/mlp.py (its docstring has the equations; both layouts
run the same per-tile math there: ``_fwd_tile_math`` / ``_fwd_tile_out``, ``_bwd_tile_factors`` / ``_bwd_tile_sums``,
``_bwd_chunk_dy`` / ``_bwd_chunk_dg``, ``_bwd_tile_dy``, ``_state_grad_terms``, ``_end_grad_terms``), but every chunk
is a few launches instead of one program per batch*head walking all chunks. The hidden-tile kernels run on the grid
(hidden tiles NH, batch*head): at D=128, hidden 256, tiles of 16 that is 16 x B*H programs. They keep only
per-tile work: whatever is summed over the hidden dim is stored as per-tile factors ([BT, HD] scratch) and
contracted over the whole hidden dim by a small kernel afterwards, and whatever every tile needs (C1 = G . q k^T,
M2 = -G . dO R^T, the gate rows) is built once per batch*head by ``_prep``. Data cross programs only through global
scratch between launches; one program reads back what its own threads wrote only in ``_bwd_tile32``, behind a
barrier (the walk needs barriers throughout).

Only what carries the recurrence runs in the chunk loops; the rest runs once for every chunk, over per-chunk
records (when the backward needs the forward; without grad the forward runs 3 launches per chunk).
Forward:  _prep's gate part (every chunk: G, C1 = G . q k^T, the gate rows, into the _prep records) ; _y_part (the
          first chunk's shares of Y0) ; per chunk c: _prep_state (rows of R from Y0 = Z W2, Z = act(gamma (k W1));
          Y0 kept) ; _fwd_tile (per tile: the read's factors A1_j, Ah_j, the tile's end state and, from it, the next
          chunk's Z_j = act(gamma (k W1_j)): ``_y_share``, ``y0_mode``) ; then _fwd_out (every chunk, per output
          block and batch*head: o = sum_j Ah_j (beta W2_j + f S2_j) - (G . sum_j Ah_j A1_j^T) R [+ q]).
Backward: _prep_m2 (every chunk: M2 = -G . dO R^T into the forward's records) ; _bwd_tile2 (pass 2 of the last
          chunk) ; per chunk c, in reverse: _bwd_sums (per batch*head and output block: SA, dC1, dq, dk, dR,
          contracted over the hidden dim) ; _bwd_mid (per batch*head: dR -> dY, dv in row
          blocks; dG; dq; dk's intra-chunk part) ; _bwd_tile32 (per tile: pass 3 of chunk c, the dY terms and the
          whole start-state gradient tile, then pass 2 of chunk c - 1, the factors A1, Ah, D1, dH, dP, dZ1's R part,
          the row partials and the carry scalars' gradient parts, which reads that tile back) ; then _bwd_end (every
          chunk: dk's dZ1 part contracted over the hidden dim, the gate gradients).
2 launches per chunk forward, 3 backward (benchmarks/RESULTS.md, session 10).
Three switches (default off, unmeasured on a GPU) take more of what the end state does not enter out of the loops,
for every chunk at once: ``split_pass2`` pass 2's read half (``_bwd_read``, before the backward's loop),
``split_sums`` also the sums' SA, dC1 and dq (``_bwd_sums_read``), ``split_read`` the training forward's read
(``_fwd_read``, after its loop).
With the LayerNorm head (cfg.norm, M(x) = [x +] w LN(W2 act(W1 x)) + b; docs/kernels-ln-head.md): _prep's state part
stores the gradient at the head's input, d = rstd P (w R_y), where R was (``_head_forward``), so the tile kernels run
unchanged; _fwd_out reads through the head on whole rows and keeps its input O; the backward starts with
``_head_read_bwd`` (dO through the read's head, one launch) and _bwd_mid's rows go back through the inner head with
LayerNorm's second-order term (``_bwd_head_dy``).
State slots as in mlp.py: [B*H, NS, in, out] fp32, the backward's state gradients in two ping-pong slots.
Static sm_90 resources of every kernel: benchmarks/kernel_resources_mlp.py.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch
import triton
import triton.language as tl

from miras.components.memory import LN_EPS
from miras.kernels.common import (
    _dot,
    _pdl_start,
    _row_select,
    _vec_select,
    bias_rows,
    bias_rows_bwd,
    chunk_block,
    chunk_rows,
    gate_coeffs,
    gate_coeffs_t,
    gate_grads,
    pow2_tile,
    store_gate_grads,
)
from miras.kernels.launcher import cheap_launches
from miras.kernels.mlp import (
    BACKWARD_GRAPHS,
    FORWARD_GRAPHS,
    MLPConfig,
    _act,
    _act_d1,
    _block_h,
    _bwd_chunk_dg,
    _bwd_chunk_dr,
    _bwd_chunk_dy,
    _bwd_tile_carry,
    _bwd_tile_dy,
    _bwd_tile_factors,
    _bwd_tile_read,
    _bwd_tile_sums,
    _capability_major,
    _end_grad_scalars,
    _end_grad_terms,
    _final_state,
    _fwd_tile_math,
    _fwd_tile_out,
    _grad_slots,
    _input_grad_buffers,
    _input_grads,
    _launch,
    _launcher,
    _prec,
    _read_hidden,
    _state_grad_terms,
    _state_slots,
    _state_tiles,
    _store_state_tiles,
)
from miras.kernels.settings import env_choice, env_switch, env_tile


def _chunk_kernel(*index_args: str):
    """``@triton.jit`` for a kernel launched once per chunk, its chunk and state-slot indices (index_args) left
    unspecialised: Triton would otherwise compile a variant for an index of 1 and for multiples of 16 (a handful of
    compiles per kernel at T=4096 instead of one)."""
    return triton.jit(do_not_specialize=index_args)


@triton.jit
def _tile_offsets(j, o_k, o_v, o_hh, k_ok, v_ok, V: tl.constexpr, HD: tl.constexpr, BH: tl.constexpr):
    """Hidden tile j: its columns o_h (mask h_ok), and the offsets / masks of W1[:, tile] and W2[tile, :] in a slot."""
    o_h = j * BH + o_hh
    h_ok = o_h < HD
    return (o_h, h_ok, o_k[:, None] * HD + o_h[None, :], k_ok[:, None] & h_ok[None, :],
            o_h[:, None] * V + o_v[None, :], h_ok[:, None] & v_ok[None, :])


@triton.jit
def _slot_offsets(i_bh, slot, n_slots, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr):
    """Offsets of batch*head i_bh's slot ``slot`` in [B*H, n_slots, K, HD] (W1, S1 and their gradients) and
    [B*H, n_slots, HD, V] (W2, S2, ...) buffers."""
    first = i_bh.to(tl.int64) * n_slots + slot
    return first * K * HD, first * HD * V


@triton.jit
def _token_offsets(i_bh, c, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Chunk c (CS tokens in BT rows, ``chunk_rows``) of batch*head i_bh: ranges, the tokens t_idx (mask t_ok), the
    gate offset p_g and the [BT, BK] / [BT, BV] offsets and masks of its q / k rows (p_tk, qk_ok) and v / dO / o rows
    (p_tv, tv_ok)."""
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_t, o_k, o_v = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    k_ok, v_ok = o_k < K, o_v < V
    _, _, t_idx, t_ok, _ = chunk_rows(c, T, o_t, BT, CS)
    p_g = i_b * T * H + i_h
    p_tk = p_g * K + t_idx[:, None] * H * K + o_k[None, :]
    p_tv = p_g * V + t_idx[:, None] * H * V + o_v[None, :]
    return (o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, t_ok[:, None] & k_ok[None, :], p_tv,
            t_ok[:, None] & v_ok[None, :])


@triton.jit
def _chunk_gamma(keep, p_g, t_idx, t_ok, H: tl.constexpr, BT: tl.constexpr, DECAYED: tl.constexpr):
    """A chunk's gamma: beta_t = prod of its keep gates up to t at the decayed gradient point, else 1."""
    gam = tl.full([BT], 1.0, dtype=tl.float32)
    if DECAYED:
        alpha = tl.load(keep + p_g + t_idx * H, mask=t_ok, other=1.0).to(tl.float32)
        gam = tl.exp(tl.cumsum(tl.log(alpha), axis=0))
    return gam


@triton.jit
def _chunk_keys(k, keep, p_g, p_tk, qk_ok, t_idx, t_ok, H: tl.constexpr, BT: tl.constexpr, DECAYED: tl.constexpr):
    """A chunk's keys (fp32) and gamma (``_chunk_gamma``)."""
    return (tl.load(k + p_tk, mask=qk_ok, other=0.0).to(tl.float32),
            _chunk_gamma(keep, p_g, t_idx, t_ok, H, BT, DECAYED))


@triton.jit
def _tile_program(k, keep, c, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr,
                  BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
                  DECAYED: tl.constexpr):
    """Program (hidden tile j, batch*head) of chunk c: its ids, the chunk's keys and gamma (``_chunk_keys``), the
    [BT, BK] / [BT, BV] token offsets and masks (p_tk, qk_ok, p_tv, tv_ok: for q, dO, o) and the tile's columns and
    state-tile offsets (``_tile_offsets``)."""
    j, i_bh = tl.program_id(0), tl.program_id(1)
    o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, qk_ok, p_tv, tv_ok = _token_offsets(
        i_bh, c, T, H, K, V, BT, CS, BK, BV)
    o_hh = tl.arange(0, BH)
    b_k, gam = _chunk_keys(k, keep, p_g, p_tk, qk_ok, t_idx, t_ok, H, BT, DECAYED)
    o_h, h_ok, w1_off, w1_ok, w2_off, w2_ok = _tile_offsets(j, o_k, o_v, o_hh, k_ok, v_ok, V, HD, BH)
    return (j, i_bh, o_t, o_k, o_v, t_idx, b_k, gam, p_tk, qk_ok, p_tv, tv_ok,
            o_h, h_ok, w1_off, w1_ok, w2_off, w2_ok)


@triton.jit
def _y_share(yp, b_k, gam, W1, W2, j, i_bh, BHN, o_t, o_v, o_h, h_ok, HD: tl.constexpr, BT: tl.constexpr,
             BV: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, YACTS: tl.constexpr):
    """Hidden tile j's share of a chunk's chunk-start prediction Y0 = act(gamma (k W1)) W2 (keys b_k, gamma, the
    state's tiles W1_j, W2_j) into yp (``y0_mode``): with YACTS its hidden activations Z_j = act(gamma (k W1_j)) into
    the tile's columns of yp [B*H, BT, HD] (``_prep_state_rows`` contracts them with W2 over the whole hidden dim),
    else its part Yp_j = Z_j W2_j of Y0 into yp [NH, B*H, BT, BV] (``_prep_state_rows`` sums the NH parts)."""
    Z = _act(gam[:, None] * _dot(b_k, W1, PREC), ACT)
    if YACTS:
        tl.store(yp + (i_bh.to(tl.int64) * BT + o_t[:, None]) * HD + o_h[None, :], Z, mask=h_ok[None, :])
    else:
        tl.store(yp + ((j * BHN + i_bh).to(tl.int64) * BT + o_t[:, None]) * BV + o_v[None, :], _dot(Z, W2, PREC))


@_chunk_kernel("c", "s_in")
def _y_part(k, keep, w1s, w2s, yp, c, s_in, T, NS, BHN,
            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, ACT: tl.constexpr, DECAYED: tl.constexpr,
            PREC: tl.constexpr, YACTS: tl.constexpr, PDL: tl.constexpr):
    """Tile j's share of Y0 (``_y_share``) for chunk c at state slot s_in (gamma = beta at the decayed gradient
    point). The forward launches it for the first chunk only: ``_fwd_tile`` forms the next chunk's."""
    _pdl_start(PDL)
    (j, i_bh, o_t, o_k, o_v, t_idx, b_k, gam, p_tk, qk_ok, p_tv, tv_ok,
     o_h, h_ok, w1_off, w1_ok, w2_off, w2_ok) = _tile_program(k, keep, c, T, H, K, V, HD, BT, CS, BK, BV, BH,
                                                                         DECAYED)
    src1, src2 = _slot_offsets(i_bh, s_in, NS, K, V, HD)
    W1 = tl.load(w1s + src1 + w1_off, mask=w1_ok, other=0.0)
    W2 = tl.load(w2s + src2 + w2_off, mask=w2_ok, other=0.0)  # (unused with YACTS)
    _y_share(yp, b_k, gam, W1, W2, j, i_bh, BHN, o_t, o_v, o_h, h_ok, HD, BT, BV, ACT, PREC, YACTS)


@triton.jit
def _start_rows(Y0, b_k, b_v, b_d, gam, t_ok, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr,
                EPS: tl.constexpr, RES: tl.constexpr):
    """Y = gamma Y0 [+ k], R = dl/dy(Y; v) (0 on padding)."""
    Y = gam[:, None] * Y0
    if RES:
        Y += b_k
    return tl.where(t_ok[:, None], bias_rows(Y, b_v, b_d, BIAS, P, SMOOTH, EPS), 0.0)


@triton.jit
def _ln_rows(u, v_ok, V: tl.constexpr, LN_EPS: tl.constexpr):
    """LayerNorm without affine over the V valid columns of each row of u (0 on the others): (xhat, rstd)."""
    mean = tl.sum(u, axis=1) / V
    centred = tl.where(v_ok[None, :], u - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / V + LN_EPS)
    return centred * rstd[:, None], rstd


@triton.jit
def _ln_vjp(g, xhat, rstd, v_ok, V: tl.constexpr):
    """LayerNorm's Jacobian (symmetric) on rows g: rstd P g = rstd (g - mean(g) - xhat mean(g xhat))."""
    g_mean = tl.sum(g, axis=1) / V
    gx_mean = tl.sum(g * xhat, axis=1) / V
    return tl.where(v_ok[None, :], rstd[:, None] * (g - g_mean[:, None] - xhat * gx_mean[:, None]), 0.0)


@triton.jit
def _head_params(nw, nb, i_bh, o_v, v_ok, H: tl.constexpr, V: tl.constexpr):
    """The LayerNorm head's weight and bias rows of batch*head i_bh's head (0 on padded columns)."""
    i_h = (i_bh % H).to(tl.int64)
    return (tl.load(nw + i_h * V + o_v, mask=v_ok, other=0.0).to(tl.float32),
            tl.load(nb + i_h * V + o_v, mask=v_ok, other=0.0).to(tl.float32))


@triton.jit
def _head_forward(Y0, b_k, b_v, b_d, gam, w, b, v_ok, V: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr,
                  SMOOTH: tl.constexpr, EPS: tl.constexpr, RES: tl.constexpr, LN_EPS: tl.constexpr):
    """The inner prediction through the LayerNorm head (docs/kernels-ln-head.md): u = gamma Y0, xhat = LN(u),
    y = [k +] w xhat + b, R = dl/dy. Returns (xhat, rstd, y, R)."""
    xhat, rstd = _ln_rows(gam[:, None] * Y0, v_ok, V, LN_EPS)
    y = w[None, :] * xhat + b[None, :]
    if RES:
        y += b_k
    return xhat, rstd, y, bias_rows(y, b_v, b_d, BIAS, P, SMOOTH, EPS)


@_chunk_kernel("c0", "s_in")
def _prep(q, k, v, eta, keep, mu, delta, nw, nb, yp, w2s, pre, ops, c0, s_in, T, NS, BHN,
          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
          BK: tl.constexpr, BV: tl.constexpr, NH: tl.constexpr, BHC: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr,
          SMOOTH: tl.constexpr, EPS: tl.constexpr, RES: tl.constexpr, HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr,
          MOMENTUM: tl.constexpr, PREC: tl.constexpr, PARTS: tl.constexpr, NORM: tl.constexpr, LN_EPS: tl.constexpr,
          R16: tl.constexpr, YACTS: tl.constexpr, PDL: tl.constexpr):
    """What every hidden tile of a chunk needs and no tile changes, built once per batch*head instead of by each of
    the NH tile programs, into ``_prep`` records (``_pre_base``). The gate part: the causal-masked [BT, BT] blocks G
    and C1 = G . q k^T, each also stored transposed (a transposed store, no tl.trans of dot results: fla #640), and
    the rows beta, f, gamma, g_L, n_L and (beta_L, f_L, m_L); it does not depend on the memory's state. The state
    part: R from Y0, which it forms from the hidden tiles' shares in yp and W2 at state slot s_in
    (``_prep_state_rows``; ``_prep_state`` also keeps Y0, for the backward); with NORM, R is the gradient at the
    LayerNorm head's input, d = rstd P (w R_y) (``_head_forward``; docs/kernels-ln-head.md).
    Program (p, i_bh, r) builds chunk c0 + r into record r * BHN + i_bh: PARTS = 0: p = 0 the gate part, p = 1 the
    state part (one chunk, without gradients); 1: the gate part (every chunk at once, before the training forward's
    loop, where ``_prep_state`` builds the state part)."""
    _pdl_start(PDL)
    p, i_bh, r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = c0 + r
    o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, qk_ok, p_tv, tv_ok = _token_offsets(
        i_bh, c, T, H, K, V, BT, CS, BK, BV)
    base = _pre_base(pre, r * BHN + i_bh, BT, BV)
    if PARTS == 1 or (PARTS == 0 and p == 0):
        b_k = tl.load(k + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
        t0, t_end, _, _, L = chunk_rows(c, T, o_t, BT, CS)
        eta_t, lb, beta, E, lm, m, NTm, G, f = gate_coeffs(
            eta + p_g, keep + p_g, mu + p_g, t0, t_end, H, o_t, BT, HAS_KEEP, MOMENTUM, PREC)
        G = tl.where(o_t[:, None] >= o_t[None, :], G, 0.0)
        gam = beta if DECAYED else tl.full([BT], 1.0, dtype=tl.float32)
        bb = o_t[:, None] * BT + o_t[None, :]
        bbt = o_t[None, :] * BT + o_t[:, None]
        b_q = tl.load(q + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
        C1 = G * _dot(b_q, tl.trans(b_k), PREC)
        tl.store(base + bb, G)
        tl.store(base + bbt + BT * BT, G)
        ob = _ops_base(ops, r * BHN + i_bh, BT)
        tl.store(ob + bb, C1.to(ops.dtype.element_ty))
        tl.store(ob + bbt + BT * BT, C1.to(ops.dtype.element_ty))
        rows = base + 2 * BT * BT + 2 * BT * BV
        tl.store(rows + o_t, beta)
        tl.store(rows + BT + o_t, f)
        tl.store(rows + 2 * BT + o_t, gam)
        tl.store(rows + 3 * BT + o_t, _row_select(G, o_t, L))
        tl.store(rows + 4 * BT + o_t, _row_select(NTm, o_t, L))
        scal = tl.where(o_t == 0, _vec_select(beta, o_t, L),
                        tl.where(o_t == 1, _vec_select(f, o_t, L), _vec_select(m, o_t, L)))
        tl.store(rows + 5 * BT + o_t, scal, mask=o_t < 3)
    if PARTS == 0 and p == 1:
        _prep_state_rows(k, v, keep, delta, nw, nb, yp, w2s, base, i_bh, 0, c, s_in, T, NS, BHN, H, K, V, HD, BT, CS,
                         BT, BK, BV, NH, BHC, BIAS, P, SMOOTH, EPS, RES, DECAYED, False, NORM, LN_EPS, PREC, R16, YACTS)


@_chunk_kernel("c", "s_in")
def _prep_state(k, v, keep, delta, nw, nb, yp, w2s, pre, c, s_in, T, NS, BHN, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BTR: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, NH: tl.constexpr, BHC: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr,
                SMOOTH: tl.constexpr, EPS: tl.constexpr, RES: tl.constexpr, DECAYED: tl.constexpr, NORM: tl.constexpr,
                LN_EPS: tl.constexpr, PREC: tl.constexpr, R16: tl.constexpr, YACTS: tl.constexpr, PDL: tl.constexpr):
    """``_prep``'s state part in the training forward's loop: program (rb, i_bh) builds the rows [rb BTR, (rb + 1) BTR)
    of chunk c's R and Y0 into its record (``_prep_state_rows``; BTR: ``_prep_rows``)."""
    _pdl_start(PDL)
    rb, i_bh = tl.program_id(0), tl.program_id(1)
    _prep_state_rows(k, v, keep, delta, nw, nb, yp, w2s, _pre_base(pre, i_bh, BT, BV), i_bh, rb, c, s_in, T, NS, BHN,
                     H, K, V, HD, BT, CS, BTR, BK, BV, NH, BHC, BIAS, P, SMOOTH, EPS, RES, DECAYED, True, NORM, LN_EPS,
                     PREC, R16, YACTS)


@triton.jit
def _row_inputs(k, v, delta, i_bh, rb, c, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                CS: tl.constexpr, BTR: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BIAS: tl.constexpr):
    """The rows [rb BTR, (rb + 1) BTR) of chunk c for batch*head i_bh: (gate offset p_g, rows o_r within the chunk,
    their tokens r_idx (mask r_ok), the [BTR, BV] offsets and mask of their v / dv rows, and k, v, the Huber deltas
    (1 elsewhere) at them, fp32)."""
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    p_g = i_b * T * H + i_h
    o_r, o_k, o_v = rb * BTR + tl.arange(0, BTR), tl.arange(0, BK), tl.arange(0, BV)
    _, _, r_idx, r_ok, _ = chunk_rows(c, T, o_r, BT, CS)
    rtv = p_g * V + r_idx[:, None] * H * V + o_v[None, :]
    rtv_ok = r_ok[:, None] & (o_v < V)[None, :]
    b_k = tl.load(k + p_g * K + r_idx[:, None] * H * K + o_k[None, :], mask=r_ok[:, None] & (o_k < K)[None, :],
                  other=0.0).to(tl.float32)
    b_v = tl.load(v + rtv, mask=rtv_ok, other=0.0).to(tl.float32)
    if BIAS == 3:
        b_d = tl.load(delta + p_g + r_idx * H, mask=r_ok, other=1.0).to(tl.float32)
    else:
        b_d = tl.zeros([BTR], dtype=tl.float32)
    return p_g, o_r, r_idx, r_ok, rtv, rtv_ok, b_k, b_v, b_d


@triton.jit
def _prep_state_rows(k, v, keep, delta, nw, nb, yp, w2s, base, i_bh, rb, c, s_in, T, NS, BHN, H: tl.constexpr,
                     K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
                     BTR: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NH: tl.constexpr, BHC: tl.constexpr,
                     BIAS: tl.constexpr,
                     P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr, RES: tl.constexpr,
                     DECAYED: tl.constexpr, STORE_Y0: tl.constexpr, NORM: tl.constexpr, LN_EPS: tl.constexpr,
                     PREC: tl.constexpr, R16: tl.constexpr, YACTS: tl.constexpr):
    """``_prep``'s state part for the rows [rb BTR, (rb + 1) BTR) of chunk c (rows are independent: R is row-wise in
    Y, and so is every bias' gradient): R from the chunk-start prediction Y0 into the record at base, and Y0 itself
    with STORE_Y0. Y0 from the hidden tiles' shares in yp (``_y_share``): with YACTS, Y0 = Z W2 over the whole
    hidden dim on tiles of BHC (Z: the tiles' activations; W2: state slot s_in, where the chunk starts), else
    Y0 = sum_j Yp_j (the tiles' parts in order, as the walk sums them)."""
    p_g, o_r, r_idx, r_ok, _, _, b_k, b_v, b_d = _row_inputs(k, v, delta, i_bh, rb, c, T, H, K, V, BT, CS, BTR, BK, BV,
                                                              BIAS)
    o_t, o_v = tl.arange(0, BT), tl.arange(0, BV)
    _, _, t_idx, t_ok, _ = chunk_rows(c, T, o_t, BT, CS)
    gam = _chunk_gamma(keep, p_g, t_idx, t_ok, H, BT, DECAYED)  # [BT]: a prefix product
    gam = tl.sum(tl.where(o_r[:, None] == o_t[None, :], gam[None, :], 0.0), axis=1)  # its rows
    Y0 = tl.zeros([BTR, BV], dtype=tl.float32)
    if YACTS:
        src2 = _slot_offsets(i_bh, s_in, NS, K, V, HD)[1]
        o_k, o_hh = tl.arange(0, BK), tl.arange(0, BHC)
        NHC: tl.constexpr = (HD + BHC - 1) // BHC
        for jj in range(NHC):
            o_h, h_ok, _w1_off, _w1_ok, w2_off, w2_ok = _tile_offsets(jj, o_k, o_v, o_hh, o_k < K, o_v < V, V, HD,
                                                                      BHC)
            Z = tl.load(yp + (i_bh.to(tl.int64) * BT + o_r[:, None]) * HD + o_h[None, :], mask=h_ok[None, :],
                        other=0.0)
            Y0 += _dot(Z, tl.load(w2s + src2 + w2_off, mask=w2_ok, other=0.0).to(tl.float32), PREC)
    else:
        for jj in range(NH):
            Y0 += tl.load(yp + ((jj * BHN + i_bh).to(tl.int64) * BT + o_r[:, None]) * BV + o_v[None, :])
    rv = o_r[:, None] * BV + o_v[None, :]
    if NORM:
        v_ok = o_v < V
        w, b = _head_params(nw, nb, i_bh, o_v, v_ok, H, V)
        xhat, rstd, _, R = _head_forward(Y0, b_k, b_v, b_d, gam, w, b, v_ok, V, BIAS, P, SMOOTH, EPS, RES, LN_EPS)
        R = tl.where(r_ok[:, None], _ln_vjp(w[None, :] * R, xhat, rstd, v_ok, V), 0.0)
    else:
        R = _start_rows(Y0, b_k, b_v, b_d, gam, r_ok, BIAS, P, SMOOTH, EPS, RES)
    r_at = _r_rows(base, BT, R16)
    tl.store(r_at + rv, R.to(r_at.dtype.element_ty))
    if STORE_Y0:
        tl.store(base + 2 * BT * BT + BT * BV + rv, Y0)


def _block_rows(BT: int) -> int:
    """Rows per program of ``_bwd_mid``'s bias VJP and, by default, of ``_prep_state`` (``_prep_rows``): a quarter of
    the chunk, at least 16."""
    return max(16, BT // 4)


def kernel_block_env(name: str) -> str:
    """The environment variable of one kernel's output block (``kernel_block``), by the kernel's name: ``_bwd_sums``
    -> ``MIRAS_KERNEL_MLP_BLOCK_BWD_SUMS``."""
    return "MIRAS_KERNEL_MLP_BLOCK_" + name.strip("_").upper()


def kernel_block(name: str, default: int, least: int, most: int) -> int:
    """How much of its output one program of kernel ``name`` forms: ``MIRAS_KERNEL_MLP_BLOCK_<KERNEL>``
    (``kernel_block_env``; a power of two >= least, clamped to most), else ``default``. Smaller blocks, more programs
    per chunk: more of the GPU for a chunk's few batch*heads, more loads shared by fewer outputs. Six kernels
    have one, each timed under a few by benchmarks/tune_mlp.py:
    - ``_prep_state``: rows of the chunk per program (default ``_block_rows``: 16 at chunk 64; ``_prep_rows``),
      each forming Y0 for its rows from the hidden tiles' shares (``_prep_state_rows``: with ``y0_mode`` "acts" each
      program reads the chunk's whole W2, so more rows per program read it fewer times);
    - ``_fwd_out``: columns of o per program (default ``_block_out``: 32; whole rows with the LayerNorm head);
    - ``_bwd_sums``: columns of dq, dk and dR per program (default ``_block_out``);
    - ``_fwd_tile``, ``_bwd_tile32``, ``_bwd_tile2``: hidden tiles per program (default 1;
      ``fwd_tiles_per_program``, ``bwd_tiles_per_program``, ``pass2_tiles_per_program``)."""
    value = env_tile(kernel_block_env(name), minimum=least)
    return default if value is None else min(value, most)


def _tiles_per_program(name: str, NH: int) -> int:
    """Hidden tiles per program of tile kernel ``name`` (``kernel_block``, default 1), a divisor of the NH tiles: the
    setting, clamped to NH, is halved until it divides NH."""
    tpp = kernel_block(name, 1, 1, NH)
    while NH % tpp:
        tpp //= 2
    return tpp


def fwd_tiles_per_program(NH: int) -> int:
    """Hidden tiles per program of ``_fwd_tile`` (``_tiles_per_program``). More per program: fewer programs (at the
    bench shape 16 x B*H = 512 for two per SM), the chunk's shared operands loaded once for several tiles, and a loop
    whose next state tile a launch config with stages > 1 prefetches."""
    return _tiles_per_program("_fwd_tile", NH)


def bwd_tiles_per_program(NH: int, fused: bool) -> int:
    """Hidden tiles per program of ``_bwd_tile32``'s pass 3 (``_tiles_per_program``); 1 when pass 2 is fused in
    (``fuse_passes``: it reads its own tile back)."""
    return 1 if fused else _tiles_per_program("_bwd_tile32", NH)


def pass2_tiles_per_program(NH: int) -> int:
    """Hidden tiles per program of ``_bwd_tile2`` (pass 2 on its own launch; ``_tiles_per_program``)."""
    return _tiles_per_program("_bwd_tile2", NH)


def _prep_rows(BT: int, yacts: bool) -> int:
    """Rows per program of ``_prep_state`` (``kernel_block``): at least 16 when its rows of Y0 are a dot
    (``y0_mode`` "acts"), else at least 4."""
    return kernel_block("_prep_state", _block_rows(BT), 16 if yacts else 4, BT)


Y0_MODES = ("acts", "parts")


def y0_mode() -> str:
    """``MIRAS_KERNEL_MLP_Y0``: how the training forward's tile programs hand the next chunk's chunk-start
    prediction Y0 = act(gamma (k W1)) W2 to ``_prep_state`` (``_y_share``). "acts" (default): each tile stores its
    hidden activations Z_j = act(gamma (k W1_j)) ([BT, BH] per tile, fp32), and ``_prep_state`` forms Y0 = Z W2 as
    one dot over the whole hidden dim, reading W2 from the state slot the tiles just wrote. "parts": each tile
    stores its part Z_j W2_j of Y0 ([BT, V] fp32 per tile) and ``_prep_state`` sums the parts. Same products (with
    bf16 dots both round Z and W2 to bf16), summed in another order. At the bench shape (D=128, hidden 256, hidden
    tiles of 16) "parts" writes 32 KB per tile program (16 MB per chunk) and "acts" 4 KB (2 MB), and "acts" drops a
    [BT, BH] x [BH, V] dot and its [BT, V] fp32 result from every ``_fwd_tile`` program."""
    return env_choice("MIRAS_KERNEL_MLP_Y0", Y0_MODES, "acts")


@triton.jit
def _prep_m2(do, pre, ops, T, BHN, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
             BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, R16: tl.constexpr, PDL: tl.constexpr):
    """The backward's addition to every chunk's ``_prep`` record, all chunks in one launch: program (i_bh, c) stores
    M2 = -G . dO R^T and M2^T (a transposed store) from the record's G and R (record c * BHN + i_bh)."""
    _pdl_start(PDL)
    i_bh, c = tl.program_id(0), tl.program_id(1)
    o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, qk_ok, p_tv, tv_ok = _token_offsets(
        i_bh, c, T, H, K, V, BT, CS, BK, BV)
    base = _pre_base(pre, c * BHN + i_bh, BT, BV)
    b_do = tl.load(do + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
    R = _load_r(base, o_t, o_v, BT, BV, R16)
    M2 = -_pre_block(base, 0, o_t, BT) * _dot(b_do, tl.trans(R), PREC)
    ob = _ops_base(ops, c * BHN + i_bh, BT)
    tl.store(ob + 2 * BT * BT + o_t[:, None] * BT + o_t[None, :], M2.to(ops.dtype.element_ty))
    tl.store(ob + 3 * BT * BT + o_t[None, :] * BT + o_t[:, None], M2.to(ops.dtype.element_ty))


@triton.jit
def _head_read_bwd(do, ohead, nw, nb, dout, hread, T, BHN, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LN_EPS: tl.constexpr,
                   PDL: tl.constexpr):
    """The read's LayerNorm head, backward, all chunks in one launch (o = [q +] w LN(O) + b): program (i_bh, c)
    stores dO = rstd P (w do) at the head's input O (ohead) into dout (fp32 [B, T, H, V]: the read's output gradient
    for the rest of the backward) and the chunk's parts of dw = sum_t do xhat, db = sum_t do into record
    c * BHN + i_bh of hread [NT, BHN, 2, BV]."""
    _pdl_start(PDL)
    i_bh, c = tl.program_id(0), tl.program_id(1)
    o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, qk_ok, p_tv, tv_ok = _token_offsets(
        i_bh, c, T, H, K, V, BT, CS, BK, BV)
    b_do = tl.load(do + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
    w, _ = _head_params(nw, nb, i_bh, o_v, v_ok, H, V)
    xhat, rstd = _ln_rows(tl.load(ohead + p_tv, mask=tv_ok, other=0.0), v_ok, V, LN_EPS)
    tl.store(dout + p_tv, _ln_vjp(w[None, :] * b_do, xhat, rstd, v_ok, V), mask=tv_ok)
    rec = hread + (c.to(tl.int64) * BHN + i_bh) * 2 * BV
    tl.store(rec + o_v, tl.sum(b_do * xhat, axis=0))
    tl.store(rec + BV + o_v, tl.sum(b_do, axis=0))


def pre_size(BT: int, BV: int) -> int:
    """Floats of one batch*head's ``_prep`` record (``_pre_base``)."""
    return 2 * BT * BT + 2 * BT * BV + 6 * BT


def operands_dtype(prec: str) -> torch.dtype:
    """``MIRAS_KERNEL_MLP_OPERANDS``: the dtype of the ``_prep`` records' dot-operand blocks (``_ops_base``: C1, C1^T,
    M2, M2^T, which every tile program of a chunk loads). "fp32" (default), "bf16" or "auto" (bf16 with bf16 dots,
    ``mlp._prec``). They feed only tl.dot, so with bf16 dots a bf16 copy gives the same products (the dot rounds its
    operands to bf16 anyway) from half the loads. Experimental: it matches the float64 oracle in the interpreter, but
    on an H100 with triton 3.6 (GPU session 15) every GPU test hit an illegal memory access with it
    (``record_buffers`` warns on Hopper)."""
    return _scratch_dtype("MIRAS_KERNEL_MLP_OPERANDS", "fp32", prec)


def r_dtype(prec: str) -> torch.dtype:
    """``MIRAS_KERNEL_MLP_R``: the dtype in which the ``_prep`` records keep R, the inner loss's gradient at the
    chunk-start prediction (``_r_rows``): "fp32" (default), "bf16" or "auto" (bf16 with bf16 dots, ``mlp._prec``).
    Every kernel uses R only as a dot operand, so with bf16 dots a bf16 R gives the same products. Its loads halve
    (32 -> 16 KB for each of the tile programs at the bench shape), and the tile kernels spill less (sm_90 static,
    aligned: ``_bwd_tile2`` 184 -> 96 B per thread). Untested on a GPU: its bf16 block feeds the dots the way the
    bf16 operands (``operands_dtype``) do, which crashed on an H100. Read once per call, into ``MLPConfig.r16``
    (``mlp.MLPScanFunction``), so that the backward reads R as the forward stored it."""
    return _scratch_dtype("MIRAS_KERNEL_MLP_R", "fp32", prec)


def record_buffers(NR: int, BHN: int, BT: int, BV: int, device, prec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """NR chunks' ``_prep`` records for BHN batch*heads: (pre [NR, BHN, pre_size] fp32, ops [NR, BHN, 4 BT^2] in
    ``operands_dtype``)."""
    ops_dtype = operands_dtype(prec)
    if ops_dtype == torch.bfloat16 and torch.device(device).type == "cuda":
        _warn_bf16_operands(_capability_major(torch.device(device).index or 0))
    return (torch.empty(NR, BHN, pre_size(BT, BV), device=device, dtype=torch.float32),
            torch.empty(NR, BHN, 4 * BT * BT, device=device, dtype=ops_dtype))


@cache
def _warn_bf16_operands(capability_major: int) -> None:
    if capability_major == 9:
        warnings.warn("MIRAS_KERNEL_MLP_OPERANDS=bf16 hit an illegal memory access in every GPU test on an H100 with "
                      "triton 3.6 (benchmarks/RESULTS.md, GPU session 15); the default is fp32", stacklevel=3)


@triton.jit
def _pre_base(pre, rec, BT: tl.constexpr, BV: tl.constexpr):
    """``_prep`` record rec (a batch*head; chunk * BHN + batch*head where pre holds every chunk's): two [BT, BT]
    blocks (0 G, 1 G^T), R and Y0 [BT, BV], six rows of BT (beta, f, gamma, g_L, n_L, then beta_L, f_L, m_L):
    ``pre_size`` floats. Its dot operands C1, C1^T, M2, M2^T are in ``_ops_base``'s record."""
    return pre + rec.to(tl.int64) * (2 * BT * BT + 2 * BT * BV + 6 * BT)


@triton.jit
def _ops_base(ops, rec, BT: tl.constexpr):
    """The dot-operand part of ``_prep`` record rec: four [BT, BT] blocks (0 C1, 1 C1^T, 2 M2, 3 M2^T), in the
    dtype of ``operands_dtype`` (``record_buffers``)."""
    return ops + rec.to(tl.int64) * (4 * BT * BT)


@triton.jit
def _pre_block(base, i: tl.constexpr, o_t, BT: tl.constexpr):
    """[BT, BT] block i of a ``_prep`` record (``_pre_base``)."""
    return tl.load(base + i * BT * BT + o_t[:, None] * BT + o_t[None, :])


@triton.jit
def _r_rows(base, BT: tl.constexpr, R16: tl.constexpr):
    """Where a ``_prep`` record keeps R ([BT, BV] after its two blocks): fp32, or bf16 with R16 (``r_dtype``), in the
    first half of the same place."""
    if R16:
        return (base + 2 * BT * BT).to(tl.pointer_type(tl.bfloat16), bitcast=True)
    else:
        return base + 2 * BT * BT


@triton.jit
def _load_r(base, o_t, o_v, BT: tl.constexpr, BV: tl.constexpr, R16: tl.constexpr):
    """A ``_prep`` record's R (``_r_rows``), as fp32."""
    return tl.load(_r_rows(base, BT, R16) + o_t[:, None] * BV + o_v[None, :]).to(tl.float32)


@triton.jit
def _load_rows(base, o_t, BT: tl.constexpr, BV: tl.constexpr):
    """A ``_prep`` record's rows at the chunk's rows o_t: (beta, f, gamma, g_L, n_L, beta_L, f_L, m_L); a caller's
    unused ones are dead code."""
    rows = base + 2 * BT * BT + 2 * BT * BV
    beta = tl.load(rows + o_t)
    f = tl.load(rows + BT + o_t)
    gam = tl.load(rows + 2 * BT + o_t)
    gL = tl.load(rows + 3 * BT + o_t)
    nL = tl.load(rows + 4 * BT + o_t)
    betaL = tl.load(rows + 5 * BT)
    fL = tl.load(rows + 5 * BT + 1)
    mL = tl.load(rows + 5 * BT + 2)
    return beta, f, gam, gL, nL, betaL, fL, mL


@triton.jit
def _next_keys(k, keep, i_bh, c, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
               CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAYED: tl.constexpr):
    """Chunk c + 1's keys and gamma (``_chunk_keys``; masked to 0 past the last chunk)."""
    _, _, _, _, _, t_idx, t_ok, p_g, p_tk, qk_ok, _, _ = _token_offsets(i_bh, c + 1, T, H, K, V, BT, CS, BK, BV)
    return _chunk_keys(k, keep, p_g, p_tk, qk_ok, t_idx, t_ok, H, BT, DECAYED)


@triton.jit
def _dot_input(x, H16: tl.constexpr):
    """A block of the chunk that only feeds dots (q, k, dO, R, gamma dY in the tile kernels), held in bf16 with H16
    (``dot_blocks_dtype``: half the registers of fp32; bf16 dots round to it anyway), else in fp32."""
    if H16:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float32)


@triton.jit
def _factor_at(buf, i: tl.constexpr, th, BHN, BT: tl.constexpr, HD: tl.constexpr):
    """Where array i of one chunk's [n, BHN, BT, HD] factor buffer (fs; ``_bwd_read``'s rf and rz) has the offsets
    th (a program's rows and hidden columns)."""
    return buf + i * BHN * BT * HD + th


@_chunk_kernel("c", "s_in", "s_out")
def _fwd_tile(q, k, keep, w1s, w2s, s1s, s2s, w1v, w2v, s1v, s2v, pre, ops, fs, yp, c, s_in, s_out, T, NS, NSV, BHN,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, ACT: tl.constexpr, MOMENTUM: tl.constexpr,
              DECAYED: tl.constexpr, PREC: tl.constexpr, R16: tl.constexpr, H16: tl.constexpr, TPP: tl.constexpr,
              YACTS: tl.constexpr, SAVE: tl.constexpr, READ: tl.constexpr, PDL: tl.constexpr):
    """Chunk c, hidden tile j, from state slot s_in (R, C1 and the gate rows from ``_prep``): the read's factors
    A1_j, Ah_j = act(beta q W1_j + f q S1_j - C1 D1_j) into the tile's columns of fs [2+, BHN, BT, HD] (``_fwd_out``
    contracts them; without READ, ``split_read``, A1_j and D1_j into fs[0] and fs[2], and ``_fwd_read`` forms Ah_j
    after the loop), the tile's end state into slot s_out and, from it, its share of the next chunk's Y0 into yp
    (``_y_share``: ``_y_part``'s work for chunk c + 1, no launch; past the last chunk its keys are masked to 0 and
    nobody reads it). With SAVE, the end state also goes, in the dtype of w1v.. (``saved_states_dtype``), into slot
    c + 1 of the saved slots w1v, w2v, s1v, s2v [BHN, NSV, in, out] that the backward reads; the state slots are then
    the recurrence's two, fp32.
    Program (jp, i_bh) walks the TPP hidden tiles j = jp TPP .. (jp + 1) TPP - 1 (``fwd_tiles_per_program``): what
    every tile of the chunk reads (q, k, R, C1, the gate rows, the next chunk's keys) is loaded once for all of them,
    and with stages > 1 the loop prefetches the next tile's state."""
    _pdl_start(PDL)
    jp, i_bh = tl.program_id(0), tl.program_id(1)
    o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, qk_ok, p_tv, tv_ok = _token_offsets(
        i_bh, c, T, H, K, V, BT, CS, BK, BV)
    b_k = _dot_input(tl.load(k + p_tk, mask=qk_ok, other=0.0), H16)
    b_q = _dot_input(tl.load(q + p_tk, mask=qk_ok, other=0.0), H16)  # (only with READ)
    base = _pre_base(pre, i_bh, BT, BV)
    R = _dot_input(_load_r(base, o_t, o_v, BT, BV, R16), H16)
    beta, f, gam, gL, nL, betaL, fL, mL = _load_rows(base, o_t, BT, BV)
    C1 = _ops_base(ops, i_bh, BT) + o_t[:, None] * BT + o_t[None, :]  # loaded where used (mlp._operand)
    src1, src2 = _slot_offsets(i_bh, s_in, NS, K, V, HD)
    dst1, dst2 = _slot_offsets(i_bh, s_out, NS, K, V, HD)
    # the next chunk's keys: with one tile per program loaded after the tile's work, where they are used (loaded
    # here, they stay live through it: an 80 B spill stack per thread against 64 at sm_90), else once for all tiles
    k_next, gam_next = _next_keys(k, keep, i_bh, c, T, H, K, V, BT, CS, BK, BV, DECAYED)
    o_hh = tl.arange(0, BH)
    for jt in range(TPP):
        j = jp * TPP + jt
        o_h, h_ok, w1_off, w1_ok, w2_off, w2_ok = _tile_offsets(j, o_k, o_v, o_hh, k_ok, v_ok, V, HD, BH)
        W1, W2, S1, S2 = _state_tiles(w1s, w2s, s1s, s2s, src1, src2, w1_off, w1_ok, w2_off, w2_ok, MOMENTUM)
        A1, Ah, D1, W1n, W2n, S1n, S2n = _fwd_tile_math(b_q, b_k, R, W1, W2, S1, S2, gam, beta, f, C1, gL, nL,
                                                        betaL, fL, mL, ACT, MOMENTUM, PREC, READ, True)
        th = (i_bh.to(tl.int64) * BT + o_t[:, None]) * HD + o_h[None, :]
        tl.store(_factor_at(fs, 0, th, BHN, BT, HD), A1.to(fs.dtype.element_ty), mask=h_ok[None, :])
        if READ:
            tl.store(_factor_at(fs, 1, th, BHN, BT, HD), Ah.to(fs.dtype.element_ty), mask=h_ok[None, :])
        else:
            tl.store(_factor_at(fs, 2, th, BHN, BT, HD), D1.to(fs.dtype.element_ty), mask=h_ok[None, :])
        _store_state_tiles(w1s, w2s, s1s, s2s, dst1, dst2, w1_off, w1_ok, w2_off, w2_ok, W1n, W2n, S1n, S2n, MOMENTUM)
        if SAVE:
            sv1, sv2 = _slot_offsets(i_bh, c + 1, NSV, K, V, HD)
            _store_state_tiles(w1v, w2v, s1v, s2v, sv1, sv2, w1_off, w1_ok, w2_off, w2_ok, W1n, W2n, S1n, S2n,
                               MOMENTUM)
        if TPP == 1:
            k_next, gam_next = _next_keys(k, keep, i_bh, c, T, H, K, V, BT, CS, BK, BV, DECAYED)
        _y_share(yp, k_next, gam_next, W1n, W2n, j, i_bh, BHN, o_t, o_v, o_h, h_ok, HD, BT, BV, ACT, PREC, YACTS)


@triton.jit
def _fwd_read(q, w1s, s1s, pre, ops, fs, T, NS, BHN,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, ACT: tl.constexpr, MOMENTUM: tl.constexpr,
              PREC: tl.constexpr, PDL: tl.constexpr):
    """The read's hidden activation Ah_j = act(beta q W1_j + f q S1_j - C1 D1_j) (``_read_hidden``) of every chunk
    at once, after the forward's loop (``split_read``): program (j, i_bh, c) on hidden tile j of chunk c, from the
    chunk-start slot c of w1s, s1s (the states kept for the backward), chunk c's ``_prep`` records and the D1_j that
    ``_fwd_tile`` left in fs[c, 2] (fs [NT, 3, BHN, BT, HD]), into fs[c, 1] beside its A1_j for ``_fwd_out``."""
    _pdl_start(PDL)
    j, i_bh, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rec = c * BHN + i_bh
    fs += c.to(tl.int64) * 3 * BHN * BT * HD
    o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, qk_ok, p_tv, tv_ok = _token_offsets(
        i_bh, c, T, H, K, V, BT, CS, BK, BV)
    b_q = tl.load(q + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
    beta, f, _, _, _, _, _, _ = _load_rows(_pre_base(pre, rec, BT, BV), o_t, BT, BV)
    C1 = _ops_base(ops, rec, BT) + o_t[:, None] * BT + o_t[None, :]  # (loaded where used: mlp._operand)
    src1 = _slot_offsets(i_bh, c, NS, K, V, HD)[0]
    o_h, h_ok, w1_off, w1_ok, _, _ = _tile_offsets(j, o_k, o_v, tl.arange(0, BH), k_ok, v_ok, V, HD, BH)
    W1 = tl.load(w1s + src1 + w1_off, mask=w1_ok, other=0.0).to(tl.float32)
    S1 = W1
    if MOMENTUM:
        S1 = tl.load(s1s + src1 + w1_off, mask=w1_ok, other=0.0).to(tl.float32)
    th = (i_bh.to(tl.int64) * BT + o_t[:, None]) * HD + o_h[None, :]
    D1 = tl.load(_factor_at(fs, 2, th, BHN, BT, HD), mask=h_ok[None, :], other=0.0).to(tl.float32)
    Ah = _read_hidden(b_q, W1, S1, C1, D1, beta, f, ACT, MOMENTUM, PREC, True)
    tl.store(_factor_at(fs, 1, th, BHN, BT, HD), Ah.to(fs.dtype.element_ty), mask=h_ok[None, :])


@_chunk_kernel("c0", "s0")
def _fwd_out(q, o, w2s, s2s, pre, fs, nw, nb, ohead, c0, s0, T, NS, BHN,
             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
             BK: tl.constexpr, BV: tl.constexpr, BHC: tl.constexpr, BVO: tl.constexpr, RES: tl.constexpr,
             MOMENTUM: tl.constexpr, PREC: tl.constexpr, NORM: tl.constexpr, LN_EPS: tl.constexpr,
             SAVE_HEAD: tl.constexpr, R16: tl.constexpr, NF: tl.constexpr, PDL: tl.constexpr):
    """Program (column block i_v of BVO, batch*head i_bh, r): the read of chunk c = c0 + r, contracted over the whole
    hidden dim on tiles of BHC from ``_fwd_tile``'s factors (fs [NR, NF, BHN, BT, HD], record r: A1, Ah, ...):
    o = sum_j Ah_j (beta W2_j + f S2_j) - (G . sum_j Ah_j A1_j^T) R [+ q] (``_fwd_tile_out``; W2, S2 of the
    chunk-start slot s0 + r; ``_prep`` record r * BHN + i_bh). Each column block forms the [BT, BT] sum itself.
    One launch per chunk (r = 0), or for every chunk after the loop (c0 = s0 = 0, r = c). With NORM (one column
    block, BVO = BV): o = [q +] w LN(O) + b, and with SAVE_HEAD the head's input O itself into ohead [B, T, H, V]."""
    _pdl_start(PDL)
    i_v, i_bh, r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, s_in = c0 + r, s0 + r
    fs += r.to(tl.int64) * NF * BHN * BT * HD
    o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, qk_ok, p_tv, tv_ok = _token_offsets(
        i_bh, c, T, H, K, V, BT, CS, BK, BV)
    o_vb = i_v * BVO + tl.arange(0, BVO)  # this program's columns of o, R, W2 (and of q: K == V with the residual)
    vb_ok = o_vb < V
    o_hh = tl.arange(0, BHC)
    base = _pre_base(pre, r * BHN + i_bh, BT, BV)
    beta, f, _, _, _, _, _, _ = _load_rows(base, o_t, BT, BV)
    src2 = _slot_offsets(i_bh, s_in, NS, K, V, HD)[1]
    O = tl.zeros([BT, BVO], dtype=tl.float32)
    SA = tl.zeros([BT, BT], dtype=tl.float32)
    NHC: tl.constexpr = (HD + BHC - 1) // BHC
    for jj in range(NHC):
        o_h, h_ok, w1_off, w1_ok, w2_off, w2_ok = _tile_offsets(jj, o_k, o_vb, o_hh, k_ok, vb_ok, V, HD, BHC)
        th = (i_bh.to(tl.int64) * BT + o_t[:, None]) * HD + o_h[None, :]
        A1 = tl.load(_factor_at(fs, 0, th, BHN, BT, HD), mask=h_ok[None, :], other=0.0).to(tl.float32)
        Ah = tl.load(_factor_at(fs, 1, th, BHN, BT, HD), mask=h_ok[None, :], other=0.0).to(tl.float32)
        W2 = tl.load(w2s + src2 + w2_off, mask=w2_ok, other=0.0).to(tl.float32)
        S2 = W2
        if MOMENTUM:
            S2 = tl.load(s2s + src2 + w2_off, mask=w2_ok, other=0.0).to(tl.float32)
        O_j, SA_j = _fwd_tile_out(A1, Ah, W2, S2, beta, f, MOMENTUM, PREC)
        O += O_j
        SA += SA_j
    R = tl.load(_r_rows(base, BT, R16) + o_t[:, None] * BV + o_vb[None, :], mask=vb_ok[None, :], other=0.0)
    R = R.to(tl.float32)
    O -= _dot(_pre_block(base, 0, o_t, BT) * SA, R, PREC)
    tok = t_ok[:, None] & vb_ok[None, :]
    if NORM:  # (BVO == BV: whole rows)
        if SAVE_HEAD:
            tl.store(ohead + p_g * V + t_idx[:, None] * H * V + o_vb[None, :], O, mask=tok)
        w, b = _head_params(nw, nb, i_bh, o_vb, vb_ok, H, V)
        O = w[None, :] * _ln_rows(O, vb_ok, V, LN_EPS)[0] + b[None, :]
    if RES:  # K == V
        O += tl.load(q + p_g * K + t_idx[:, None] * H * K + o_vb[None, :], mask=tok, other=0.0).to(tl.float32)
    tl.store(o + p_g * V + t_idx[:, None] * H * V + o_vb[None, :], O.to(o.dtype.element_ty), mask=tok)


# the launch config of the contractions over the hidden dim (_fwd_out, _bwd_sums, _bwd_end): "warps,stages" as
# MIRAS_KERNEL_MLP_CONFIG, which applies when this is unset. Their loops walk the hidden tiles loading the factors and
# state tiles anew at each step, so more stages (software pipelining of those loads) may pay there, where the tile
# kernels have no such loop (benchmarks/variants.py: sums3, sums8; unmeasured)
SUMS_CONFIG = "MIRAS_KERNEL_MLP_SUMS_CONFIG"


def _block_out(width: int) -> int:
    """Column block of the contraction kernels' outputs (``_fwd_out``'s o, ``_bwd_sums``' dq, dk, dR): 32, or half
    the padded width below 64 (at least 16), so that a batch*head's contraction spreads over several programs (4
    per output at the bench's head dim of 128)."""
    tile = pow2_tile(width)
    return min(32, max(16, tile // 2))


def _out_block(V: int, BV: int, norm: bool) -> int:
    """``_fwd_out``'s column block (``kernel_block``): whole rows with the LayerNorm head, which normalises them."""
    return BV if norm else kernel_block("_fwd_out", _block_out(V), 16, BV)


def _sums_blocks(BK: int, BV: int) -> tuple[int, int]:
    """``_bwd_sums``' column blocks of dq / dk and of dR (``kernel_block``)."""
    return kernel_block("_bwd_sums", _block_out(BK), 16, BK), kernel_block("_bwd_sums", _block_out(BV), 16, BV)


def _block_sums(hidden: int) -> int:
    """Hidden tile of the contractions over the hidden dim (``_fwd_out``, ``_bwd_sums``): 32, at most the padded
    hidden width."""
    return min(32, pow2_tile(hidden))


SCRATCH_DTYPES = ("fp32", "bf16", "auto")


def _scratch_dtype(name: str, default: str, prec: str) -> torch.dtype:
    """The dtype the environment variable ``name`` (one of SCRATCH_DTYPES, else ``default``) asks of a scratch
    buffer that only feeds dots: "auto" is bf16 with bf16 dots (``mlp._prec``), else fp32."""
    choice = env_choice(name, SCRATCH_DTYPES, default)
    return torch.bfloat16 if choice == "bf16" or (choice == "auto" and prec == "bf16") else torch.float32


def factors_dtype(prec: str) -> torch.dtype:
    """``MIRAS_KERNEL_MLP_FACTORS``: the dtype of the per-tile factors the tile kernels store for the contractions
    over the hidden dim (fs: the read's A1, Ah; the backward's A1, Ah, D1, dH, dP). "auto" (default: bf16 with bf16
    dots, ``mlp._prec``, else fp32), "fp32" or "bf16". bf16 halves their memory traffic; with bf16 dots every one of
    them is scaled row-wise and rounded to a bf16 dot operand afterwards anyway, so bf16 storage rounds once more.
    On an H100 (GPU session 15, bench shape) the kernels took 10.97 instead of 11.29 ms per fwd+bwd step
    (``_bwd_sums`` 1.86 -> 1.69 ms, ``_fwd_out`` 0.38 -> 0.32), and every bf16 GPU test kept its errors (<= 1.2e-2)."""
    return _scratch_dtype("MIRAS_KERNEL_MLP_FACTORS", "auto", prec)


def mlp_tiles_fwd(cfg: MLPConfig, q, k, v, eta, keep, mu, delta, w1, w2, s1, s2, keep_states: bool,
                  head: tuple | None = None):
    """Forward, same contract as miras.kernels.mlp.mlp_scan_fwd, except that what it keeps for the backward is the
    state slots and every chunk's ``_prep`` record: (o, final state, (w1s, w2s, s1s, s2s, pre) or None; with the
    LayerNorm head (cfg.norm; head = its weight and bias, fp32 [H, V]) also (w, b, the head's input O [B, T, H, V])).
    Every buffer is allocated here; the launches (``_fwd_launches``) run through ``FORWARD_GRAPHS``: replayed as a
    CUDA graph when ``MIRAS_KERNEL_MLP_FORWARD_GRAPHS`` (by default ``MIRAS_KERNEL_MLP_GRAPHS``) is on, so that
    their ~130 host launches at T=4096 cost one replay."""
    B, T, H, K = q.shape
    V, HD, BT = v.shape[-1], cfg.hidden, chunk_block(cfg.chunk)
    NT = triton.cdiv(T, cfg.chunk)
    # the state slots: every chunk-start state when the backward needs them, else the recurrence's two; with saved
    # states in bf16 (saved_states_dtype) the recurrence's two, and the backward's copies apart
    split = keep_states and saved_states_dtype(_prec(q)) == torch.bfloat16
    NS = NT + 1 if keep_states and not split else 2
    slots = _state_slots(cfg, q, v, w1, w2, s1, s2, NS)
    kept = _saved_slots(cfg, slots, NT + 1, torch.bfloat16) if split else slots
    BV, BH = pow2_tile(V), _block_h(HD, BT)
    NH = triton.cdiv(HD, BH)
    f32 = dict(device=q.device, dtype=torch.float32)
    # per-chunk scratch: the hidden tiles' shares of Y0 (_y_share)
    yp = torch.empty(B * H, BT, HD, **f32) if y0_mode() == "acts" else torch.empty(NH, B * H, BT, BV, **f32)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    gates = (eta, keep if keep is not None else eta, mu if mu is not None else eta)
    delta_ = delta if delta is not None else eta
    nw, nb = head if cfg.norm else (eta, eta)  # (unread stand-ins without the head)
    ohead = torch.empty(B, T, H, V, **f32) if cfg.norm and keep_states else eta  # the head's input, for the backward
    # _prep's records and the read's factors: every chunk's when the backward needs them (then _fwd_out runs once
    # for every chunk after the loop, and the backward reuses the records), else one chunk's, reused
    NR = NT if keep_states else 1
    pre, ops = record_buffers(NR, B * H, BT, BV, q.device, _prec(q))
    # (with the read after the loop, split_read: A1, Ah, and D1 from the loop to _fwd_read)
    NF = 3 if keep_states and split_read() else 2
    fs = torch.empty(NR, NF, B * H, BT, HD, device=q.device, dtype=factors_dtype(_prec(q)))
    FORWARD_GRAPHS(_fwd_launches, "tiles", cfg, keep_states, q, k, v, gates, delta_, nw, nb, slots, kept, o, yp,
                   ohead, pre, ops, fs)
    saved = (*kept, pre, ops, *((nw, nb, ohead) if cfg.norm else ()))
    return o, _final_state(cfg, slots, NT % NS, q, v), (saved if keep_states else None)


def dot_blocks_dtype(prec: str) -> torch.dtype:
    """``MIRAS_KERNEL_MLP_DOT_BLOCKS``: the dtype in which the tile kernels (``_fwd_tile``, ``_bwd_read``, pass 2,
    pass 3) hold the chunk's blocks that only feed dots, q, k, dO, R and gamma dY ([BT, D] each, 64 registers per
    thread apiece in fp32 at the bench shape): "fp32" (default), "bf16" or "auto" (bf16 with bf16 dots, ``mlp._prec``).
    With bf16 dots the products are the same (the dot rounds its operands to bf16 anyway); the registers freed cut
    the spills at sm_90 (triton 3.6): pass 3 (``_bwd_tile32``) 296 -> 104 B per thread, the forward's loop kernel
    without its read (``split_read``) 96 -> 0 B. Unmeasured on a GPU."""
    return _scratch_dtype("MIRAS_KERNEL_MLP_DOT_BLOCKS", "fp32", prec)


def saved_states_dtype(prec: str) -> torch.dtype:
    """``MIRAS_KERNEL_MLP_STATES``: the dtype of the chunk-start states the training forward keeps for the backward:
    "fp32" (default: the forward's own state slots, one per chunk), "bf16" or "auto" (bf16 with bf16 dots,
    ``mlp._prec``). With bf16 the forward runs its recurrence in two fp32 slots and writes each chunk's end state a
    second time, rounded, into bf16 slots (``_fwd_tile``'s SAVE). The backward's passes (pass 2, pass 3,
    ``_bwd_sums``, ``_bwd_end``) and the read (``_fwd_out``) then load half the bytes of state, and the kept slots
    take half the memory (0.5 instead of 1 GB at the bench shape). Each of them uses the state as a bf16 dot operand
    (rounded anyway) or in the carry scalars' sums against the state gradient. Unmeasured on a GPU."""
    return _scratch_dtype("MIRAS_KERNEL_MLP_STATES", "fp32", prec)


def _saved_slots(cfg: MLPConfig, slots: tuple, NSV: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The backward's copies of the chunk-start states (``saved_states_dtype``): (w1v, w2v, s1v, s2v) [B*H, NSV, in,
    out] in dtype, slot 0 the initial state from slot 0 of the state slots (the forward writes the others); without
    momentum s1v / s2v are w1v / w2v."""

    def copy(x: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(x.shape[0], NSV, *x.shape[2:], device=x.device, dtype=dtype)
        buf[:, 0] = x[:, 0]
        return buf

    w1v, w2v = copy(slots[0]), copy(slots[1])
    return (w1v, w2v, copy(slots[2]), copy(slots[3])) if cfg.momentum else (w1v, w2v, w1v, w2v)


def _fwd_launches(cfg: MLPConfig, keep_states: bool, q, k, v, gates, delta, nw, nb, slots, kept, o, yp, ohead, pre,
                  ops, fs) -> tuple:
    """The forward's launches into the buffers ``mlp_tiles_fwd`` allocated (with keep_states, the training forward's:
    every chunk's records and chunk-start states, the latter in the state slots themselves or, where they are the
    recurrence's two, in the saved slots kept; else one chunk's records and two ping-pong slots). Two launches per chunk
    (``_prep_state``, ``_fwd_tile``), and ``_y_part``, ``_prep``'s gate part and ``_fwd_out`` once for every chunk
    (forward alone: three launches per chunk, ``_prep``, ``_fwd_tile``, ``_fwd_out``); with three factors per chunk
    in fs (``split_read``), ``_fwd_read`` once for every chunk before ``_fwd_out``. Returns (): it writes only into
    its arguments, so a graph of it has no outputs to copy out."""
    B, T, H, K = q.shape
    V, HD, BT = v.shape[-1], cfg.hidden, chunk_block(cfg.chunk)
    NT, NR, NS, NSV = triton.cdiv(T, cfg.chunk), pre.shape[0], slots[0].shape[1], kept[0].shape[1]
    read_after = fs.shape[1] == 3  # (split_read: the read's Ah formed after the loop, by _fwd_read)
    w1s, w2s, s1s, s2s = slots
    save = kept[0] is not slots[0]  # (the saved slots apart: _fwd_tile writes them too)
    BK, BV, BH = pow2_tile(K), pow2_tile(V), _block_h(HD, BT)
    NH = triton.cdiv(HD, BH)
    yacts = yp.dim() == 3  # (y0_mode "acts": [B*H, BT, HD]; "parts": [NH, B*H, BT, BV])
    dims = dict(H=H, K=K, V=V, BT=BT, CS=cfg.chunk, BK=BK, BV=BV, PREC=_prec(q))
    tiles = dict(dims, HD=HD, BH=BH, ACT=cfg.act, DECAYED=cfg.decayed, YACTS=yacts)
    norm = dict(NORM=cfg.norm, LN_EPS=LN_EPS, R16=cfg.r16)  # (R16: every kernel that writes or reads R does these)
    state_kw = dict(dims, **norm, HD=HD, NH=NH, BHC=_block_sums(HD), BIAS=cfg.bias, P=cfg.p, SMOOTH=cfg.smoothing,
                    EPS=cfg.eps, RES=cfg.residual, DECAYED=cfg.decayed, YACTS=yacts)  # (the state part's)
    prep_kw = dict(state_kw, HAS_KEEP=cfg.has_keep, MOMENTUM=cfg.momentum)
    out_kw = dict(dims, **norm, HD=HD, BHC=_block_sums(HD), BVO=_out_block(V, BV, cfg.norm), RES=cfg.residual,
                  MOMENTUM=cfg.momentum, SAVE_HEAD=cfg.norm and keep_states, NF=fs.shape[1])  # (the head: whole rows)
    pre_c, ops_c, fs_c = pre.unbind(0), ops.unbind(0), fs.unbind(0)
    grid = (NH, B * H)
    NVO = triton.cdiv(V, out_kw["BVO"])
    if keep_states:  # the records' gate part, which the state does not change, for every chunk at once; the loop's
        # _prep_state then builds the state part alone, in row blocks
        _launch(_prep, (1, B * H, NT), q, k, v, *gates, delta, nw, nb, yp, w2s, pre, ops, 0, 0, T, NS, B * H,
                **prep_kw, PARTS=1)
        rows = _prep_rows(BT, yacts)
        prep = _launcher(_prep_state, (BT // rows, B * H), **state_kw, BTR=rows)
    else:  # both parts of one chunk per launch
        prep = _launcher(_prep, (2, B * H, 1), **prep_kw, PARTS=0)
    # the first chunk's shares of Y0 (each later chunk's come from the previous chunk's _fwd_tile)
    _launch(_y_part, grid, k, gates[1], w1s, w2s, yp, 0, 0, T, NS, B * H, **tiles)
    # the loop's launches, bound once (miras/kernels/launcher.py: less host time per launch)
    tpp = fwd_tiles_per_program(NH)
    fwd_tile = _launcher(_fwd_tile, (NH // tpp, B * H), **tiles, MOMENTUM=cfg.momentum, R16=cfg.r16, TPP=tpp,
                         SAVE=save, READ=not read_after, H16=dot_blocks_dtype(_prec(q)) == torch.bfloat16)
    fwd_out = _launcher(_fwd_out, (NVO, B * H, 1), SUMS_CONFIG, **out_kw)
    for c in range(NT):
        s_in, s_out, r = c % NS, (c + 1) % NS, c % NR
        if keep_states:
            prep(k, v, gates[1], delta, nw, nb, yp, w2s, pre_c[r], c, s_in, T, NS, B * H)
        else:
            prep(q, k, v, *gates, delta, nw, nb, yp, w2s, pre_c[r], ops_c[r], c, s_in, T, NS, B * H)
        fwd_tile(q, k, gates[1], *slots, *kept, pre_c[r], ops_c[r], fs_c[r], yp, c, s_in, s_out, T, NS, NSV, B * H)
        if not keep_states:
            fwd_out(q, o, w2s, s2s, pre, fs, nw, nb, ohead, c, s_in, T, NS, B * H)
    if read_after:  # (from the chunk-start states kept)
        _launch(_fwd_read, (NH, B * H, NT), q, kept[0], kept[2], pre, ops, fs, T, NSV, B * H, H=H, K=K, V=V, HD=HD,
                BT=BT, CS=cfg.chunk, BK=BK, BV=BV, BH=BH, ACT=cfg.act, MOMENTUM=cfg.momentum, PREC=_prec(q))
    if keep_states:  # (from the chunk-start states kept)
        _launch(_fwd_out, (NVO, B * H, NT), q, o, kept[1], kept[3], pre, fs, nw, nb, ohead, 0, 0, T, NSV, B * H,
                config_env=SUMS_CONFIG, **out_kw)
    return ()


# ------------------------------------------------------------------------------------------------------------ backward


@_chunk_kernel("c", "s_src", "e")
def _bwd_tile2(q, k, do, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre, ops, xs, fs, fdp, rz, rrow, prow, c, s_src,
               e, T, NS, BHN,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, ACT: tl.constexpr,
               DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr, R16: tl.constexpr, H16: tl.constexpr,
               TPP: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr):
    """Pass 2 of chunk c on its own launch: every chunk's when the passes are apart (``fuse_passes``), else the last
    chunk's (the others run in ``_bwd_tile32`` behind the next chunk's pass 3). The whole pass (``_pass2``), or with
    SPLIT (``split_pass2``) its carry half alone (``_pass2_carry``; ``_bwd_read`` ran the read half before the loop)."""
    _pdl_start(PDL)
    if SPLIT:
        _pass2_carry(k, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre, xs, fdp, rz, rrow, prow, c, s_src, e, T,
                     NS, BHN, H, K, V, HD, BT, CS, BK, BV, BH, ACT, DECAYED, MOMENTUM, PREC, R16, H16, TPP)
    else:
        _pass2(q, k, do, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre, ops, xs, fs, fdp, prow, c, s_src, e, T,
               NS, BHN, H, K, V, HD, BT, CS, BK, BV, BH, ACT, DECAYED, MOMENTUM, PREC, R16, H16, TPP)


@triton.jit
def _pass2_inputs(q, k, do, pre, ops, rec, o_t, o_v, p_tk, qk_ok, p_tv, tv_ok, BT: tl.constexpr, BV: tl.constexpr,
                  R16: tl.constexpr, H16: tl.constexpr):
    """What pass 2's tiles of a chunk share (either the whole pass or ``_bwd_read``'s read half): k, q, dO, and from
    ``_prep`` record rec R, the gate rows (``_load_rows``) and the pointers of C1, C1^T, M2, M2^T (loaded where
    used: ``mlp._operand``)."""
    b_k = _dot_input(tl.load(k + p_tk, mask=qk_ok, other=0.0), H16)
    b_q = _dot_input(tl.load(q + p_tk, mask=qk_ok, other=0.0), H16)
    b_do = _dot_input(tl.load(do + p_tv, mask=tv_ok, other=0.0), H16)
    base = _pre_base(pre, rec, BT, BV)
    R = _dot_input(_load_r(base, o_t, o_v, BT, BV, R16), H16)
    beta, f, gam, gL, nL, betaL, fL, mL = _load_rows(base, o_t, BT, BV)
    bb = _ops_base(ops, rec, BT) + o_t[:, None] * BT + o_t[None, :]
    return (b_k, b_q, b_do, R, beta, f, gam, gL, nL, betaL, fL, mL,
            bb, bb + BT * BT, bb + 2 * BT * BT, bb + 3 * BT * BT)


@triton.jit
def _pass2_tiles(w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, prow, src1, src2, e1, e2, j, i_bh, BHN, w1_off, w1_ok,
                 w2_off, w2_ok, BT: tl.constexpr, MOMENTUM: tl.constexpr):
    """Pass 2's (either half's) loads of hidden tile j: the chunk-start state's tiles (slots src), the end state's
    gradient tiles (slots e), and the carry scalars' parts d beta_L = <dW', W>, d f_L = <dW', S>, d m_L = <dS', S>
    (``_end_grad_scalars``) stored at once into the tile's partials rw (``_prow_base``), which it returns too."""
    W1, W2, S1, S2 = _state_tiles(w1s, w2s, s1s, s2s, src1, src2, w1_off, w1_ok, w2_off, w2_ok, MOMENTUM)
    dW1e, dW2e, dS1e, dS2e = _state_tiles(dw1s, dw2s, ds1s, ds2s, e1, e2, w1_off, w1_ok, w2_off, w2_ok, MOMENTUM)
    # the carry scalars' parts first: formed after the factors instead, they keep all eight state tiles live
    # through the pass (sm_90, triton 3.6, benchmarks/kernel_resources_mlp.py: a 592 B spill stack per thread
    # against 176 here and 152 without them; in pass 3 they cost more still)
    dbL, dfL, dmL = _end_grad_scalars(W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, MOMENTUM)
    rw = _prow_base(prow, j * BHN + i_bh, BT)
    o_s = tl.arange(0, 4)
    tl.store(rw + 5 * BT + o_s, tl.where(o_s == 0, dbL, tl.where(o_s == 1, dfL, dmL)), mask=o_s < 3)
    return W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, rw


@triton.jit
def _store_pass2_rows(rw, dbeta, df, dgam, dgL, dnL, o_t, BT: tl.constexpr):
    """Pass 2's row partials of a hidden tile (``_prow_base``'s five rows of BT)."""
    tl.store(rw + o_t, dbeta)
    tl.store(rw + BT + o_t, df)
    tl.store(rw + 2 * BT + o_t, dgam)
    tl.store(rw + 3 * BT + o_t, dgL)
    tl.store(rw + 4 * BT + o_t, dnL)


@triton.jit
def _pass2(q, k, do, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre, ops, xs, fs, fdp, prow, c, s_src, e, T, NS, BHN,
           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
           BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, ACT: tl.constexpr,
           DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr, R16: tl.constexpr, H16: tl.constexpr,
           TPP: tl.constexpr):
    """Pass 2 of hidden tile j (R, C1, M2, their transposes and the gate rows from ``_prep``): the tile's factors
    A1, Ah, D1, dH into its columns of fs [4+, BHN, BT, HD] and dP into fdp [BHN, BT, HD] (``_bwd_sums`` contracts
    them, pass 3 forms the start-state gradient tiles from them), X into xs and the tile's partials (``_prow_base``,
    slot j * BHN + i_bh): the rows dbeta, df, dgam, dgL, dnL and the carry scalars' d beta_L, d f_L, d m_L (their
    inner products of the chunk-start state with the end state's gradient, ``_end_grad_scalars``, on the tiles this
    pass loads anyway).
    Program (jp, i_bh) walks the TPP hidden tiles j = jp TPP .. (jp + 1) TPP - 1 (``pass2_tiles_per_program``),
    loading what they share (q, k, dO, R, the gate rows) once."""
    jp, i_bh = tl.program_id(0), tl.program_id(1)
    o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, qk_ok, p_tv, tv_ok = _token_offsets(
        i_bh, c, T, H, K, V, BT, CS, BK, BV)
    (b_k, b_q, b_do, R, beta, f, gam, gL, nL, betaL, fL, mL,
     C1, C1T, M2, M2T) = _pass2_inputs(q, k, do, pre, ops, i_bh, o_t, o_v, p_tk, qk_ok, p_tv, tv_ok, BT, BV, R16, H16)
    src1, src2 = _slot_offsets(i_bh, s_src, NS, K, V, HD)
    e1, e2 = _slot_offsets(i_bh, e, 2, K, V, HD)
    o_hh = tl.arange(0, BH)
    fty = fs.dtype.element_ty
    for jt in range(TPP):
        j = jp * TPP + jt
        o_h, h_ok, w1_off, w1_ok, w2_off, w2_ok = _tile_offsets(j, o_k, o_v, o_hh, k_ok, v_ok, V, HD, BH)
        W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, rw = _pass2_tiles(
            w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, prow, src1, src2, e1, e2, j, i_bh, BHN, w1_off, w1_ok,
            w2_off, w2_ok, BT, MOMENTUM)
        # (what it also returns, the start-state gradient tiles (pass 3 forms them) and the scalars, is dead code)
        (A1, Ah, D1, dH, dP, dbeta, df, dgam, dgL, dnL, _, _, _,
         X, _, _, _, _) = _bwd_tile_factors(b_q, b_k, b_do, R, W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, gam, beta, f,
                                            C1, C1T, M2, M2T, gL, nL, betaL, fL, mL, ACT, DECAYED, MOMENTUM, PREC,
                                            True)
        th = (i_bh.to(tl.int64) * BT + o_t[:, None]) * HD + o_h[None, :]
        tl.store(xs + th, X, mask=h_ok[None, :])
        tl.store(_factor_at(fs, 0, th, BHN, BT, HD), A1.to(fty), mask=h_ok[None, :])
        tl.store(_factor_at(fs, 1, th, BHN, BT, HD), Ah.to(fty), mask=h_ok[None, :])
        tl.store(_factor_at(fs, 2, th, BHN, BT, HD), D1.to(fty), mask=h_ok[None, :])
        tl.store(_factor_at(fs, 3, th, BHN, BT, HD), dH.to(fty), mask=h_ok[None, :])
        tl.store(fdp + th, dP.to(fty), mask=h_ok[None, :])
        _store_pass2_rows(rw, dbeta, df, dgam, dgL, dnL, o_t, BT)


@triton.jit
def _bwd_read(q, k, do, w1s, w2s, s1s, s2s, pre, ops, rf, rz, rrow, T, NS, BHN,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, ACT: tl.constexpr, MOMENTUM: tl.constexpr,
              PREC: tl.constexpr, R16: tl.constexpr, H16: tl.constexpr, TPP: tl.constexpr, PDL: tl.constexpr):
    """The read half of pass 2 (``_bwd_tile_read``: what the end state's gradient does not enter) of every chunk at
    once, before the backward's chunk loop (``split_pass2``). Program (jp, i_bh, c), hidden tiles
    j = jp TPP .. (jp + 1) TPP - 1 of chunk c, from the chunk-start state slot c, dO and the chunk's ``_prep`` records
    (record c * BHN + i_bh of pre and ops, which hold every chunk's): into rf[c] [4, BHN, BT, HD] A1, Ah, D1, dH (the
    factors' dtype: ``_bwd_sums`` and pass 3 read them), into rz[c] [4, BHN, BT, HD] fp32 Zk = k W1_j, Pm = R W2_j^T
    and the read's parts dA1r, dD1r of dA1, dD1 (the carry half, ``_pass2_carry``, reads them), and the rows
    dbeta, df into rrow[c] [NH, BHN, 2, BT]."""
    _pdl_start(PDL)
    jp, i_bh, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rec = c.to(tl.int64) * BHN
    rf += rec * 4 * BT * HD
    rz += rec * 4 * BT * HD
    rrow += rec * ((HD + BH - 1) // BH) * 2 * BT
    o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, qk_ok, p_tv, tv_ok = _token_offsets(
        i_bh, c, T, H, K, V, BT, CS, BK, BV)
    (b_k, b_q, b_do, R, beta, f, gam, _, _, _, _, _,
     C1, C1T, M2, M2T) = _pass2_inputs(q, k, do, pre, ops, c * BHN + i_bh, o_t, o_v, p_tk, qk_ok, p_tv, tv_ok, BT, BV,
                                       R16, H16)
    src1, src2 = _slot_offsets(i_bh, c, NS, K, V, HD)
    o_hh = tl.arange(0, BH)
    fty = rf.dtype.element_ty
    for jt in range(TPP):
        j = jp * TPP + jt
        o_h, h_ok, w1_off, w1_ok, w2_off, w2_ok = _tile_offsets(j, o_k, o_v, o_hh, k_ok, v_ok, V, HD, BH)
        W1, W2, S1, S2 = _state_tiles(w1s, w2s, s1s, s2s, src1, src2, w1_off, w1_ok, w2_off, w2_ok, MOMENTUM)
        Zk, Pm, A1, Ah, D1, dH, dA1r, dD1r, dbeta, df = _bwd_tile_read(b_q, b_k, b_do, R, W1, W2, S1, S2, gam, beta,
                                                                       f, C1, C1T, M2, M2T, ACT, MOMENTUM, PREC,
                                                                       True)
        th = (i_bh.to(tl.int64) * BT + o_t[:, None]) * HD + o_h[None, :]
        m = h_ok[None, :]
        tl.store(_factor_at(rf, 0, th, BHN, BT, HD), A1.to(fty), mask=m)
        tl.store(_factor_at(rf, 1, th, BHN, BT, HD), Ah.to(fty), mask=m)
        tl.store(_factor_at(rf, 2, th, BHN, BT, HD), D1.to(fty), mask=m)
        tl.store(_factor_at(rf, 3, th, BHN, BT, HD), dH.to(fty), mask=m)
        tl.store(_factor_at(rz, 0, th, BHN, BT, HD), Zk, mask=m)
        tl.store(_factor_at(rz, 1, th, BHN, BT, HD), Pm, mask=m)
        tl.store(_factor_at(rz, 2, th, BHN, BT, HD), dA1r, mask=m)
        tl.store(_factor_at(rz, 3, th, BHN, BT, HD), dD1r, mask=m)
        rr = rrow + (j * BHN + i_bh).to(tl.int64) * 2 * BT + o_t
        tl.store(rr, dbeta)
        tl.store(rr + BT, df)


@triton.jit
def _pass2_carry(k, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre, xs, fdp, rz, rrow, prow, c, s_src, e, T, NS, BHN,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, ACT: tl.constexpr, DECAYED: tl.constexpr,
                 MOMENTUM: tl.constexpr, PREC: tl.constexpr, R16: tl.constexpr, H16: tl.constexpr, TPP: tl.constexpr):
    """The carry half of pass 2 of chunk c (``_bwd_tile_carry``: what the end state's gradient, slot e, enters),
    from the read half's records of the chunk (rz [4, BHN, BT, HD], rrow [NH, BHN, 2, BT]: ``_bwd_read``): the same
    outputs as ``_pass2`` but the read's factors (already in ``_bwd_read``'s rf): dP into fdp, X into xs, the rows
    and the carry scalars' parts into prow. Four dots per tile (two without momentum) instead of fourteen."""
    jp, i_bh = tl.program_id(0), tl.program_id(1)
    o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, qk_ok, p_tv, tv_ok = _token_offsets(
        i_bh, c, T, H, K, V, BT, CS, BK, BV)
    b_k = _dot_input(tl.load(k + p_tk, mask=qk_ok, other=0.0), H16)
    base = _pre_base(pre, i_bh, BT, BV)
    R = _dot_input(_load_r(base, o_t, o_v, BT, BV, R16), H16)
    _, _, gam, gL, nL, _, _, _ = _load_rows(base, o_t, BT, BV)
    src1, src2 = _slot_offsets(i_bh, s_src, NS, K, V, HD)
    e1, e2 = _slot_offsets(i_bh, e, 2, K, V, HD)
    o_hh = tl.arange(0, BH)
    for jt in range(TPP):
        j = jp * TPP + jt
        o_h, h_ok, w1_off, w1_ok, w2_off, w2_ok = _tile_offsets(j, o_k, o_v, o_hh, k_ok, v_ok, V, HD, BH)
        W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, rw = _pass2_tiles(
            w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, prow, src1, src2, e1, e2, j, i_bh, BHN, w1_off, w1_ok,
            w2_off, w2_ok, BT, MOMENTUM)
        th = (i_bh.to(tl.int64) * BT + o_t[:, None]) * HD + o_h[None, :]
        m = h_ok[None, :]
        Zk = tl.load(_factor_at(rz, 0, th, BHN, BT, HD), mask=m, other=0.0)
        Pm = tl.load(_factor_at(rz, 1, th, BHN, BT, HD), mask=m, other=0.0)
        dA1r = tl.load(_factor_at(rz, 2, th, BHN, BT, HD), mask=m, other=0.0)
        dD1r = tl.load(_factor_at(rz, 3, th, BHN, BT, HD), mask=m, other=0.0)
        Z1 = gam[:, None] * Zk
        s1 = _act_d1(Z1, ACT)
        dP, dgam, dgL, dnL, X = _bwd_tile_carry(b_k, R, Z1, s1, Pm, _act(Z1, ACT), gam[:, None] * Pm * s1, dA1r,
                                                dD1r, dW1e, dW2e, dS1e, dS2e, gam, gL, nL, ACT, DECAYED, MOMENTUM,
                                                PREC)
        tl.store(xs + th, X, mask=m)
        tl.store(fdp + th, dP.to(fdp.dtype.element_ty), mask=m)
        rr = rrow + (j * BHN + i_bh).to(tl.int64) * 2 * BT + o_t
        _store_pass2_rows(rw, tl.load(rr), tl.load(rr + BT), dgam, dgL, dnL, o_t, BT)


def sums_size(BT: int, BK: int, BV: int) -> int:
    """Floats of one batch*head's ``_bwd_sums`` record (``_sums_base``)."""
    return 2 * BT * BT + BT * BV + 2 * BT * BK


@triton.jit
def _sums_base(sums, i_bh, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Batch*head i_bh's ``_bwd_sums`` record: SA, dC1 [BT, BT], dR [BT, BV], dq, dk [BT, BK]: ``sums_size``
    floats."""
    return sums + i_bh.to(tl.int64) * (2 * BT * BT + BT * BV + 2 * BT * BK)


def prow_size(BT: int) -> int:
    """Floats of one hidden tile's pass-2 partials (``_prow_base``)."""
    return 5 * BT + 4


@triton.jit
def _prow_base(prow, slot, BT: tl.constexpr):
    """Pass 2's partials of hidden tile j for batch*head i_bh (slot j * BHN + i_bh of prow [NH, BHN, prow_size]):
    five rows of BT (dbeta, df, dgam, dgL, dnL), then d beta_L, d f_L, d m_L and a pad (16-byte records)."""
    return prow + slot.to(tl.int64) * (5 * BT + 4)


@triton.jit
def _sums_tile(fs, fdp, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, i_bh, jj, src1, src2, e1, e2, BHN, o_t, o_k, o_v,
               k_ok, v_ok, o_hh, beta, f, gL, nL, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr,
               BT: tl.constexpr, BHC: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """``_bwd_tile_sums`` of hidden columns [jj BHC, (jj + 1) BHC): factors from fs (A1, Ah, D1, dH) and fdp (dP),
    tiles of the chunk-start state (src) and of the end state's gradient (e). Loads that the caller's outputs do not
    need are dead code."""
    o_h, h_ok, w1_off, w1_ok, w2_off, w2_ok = _tile_offsets(jj, o_k, o_v, o_hh, k_ok, v_ok, V, HD, BHC)
    th = (i_bh.to(tl.int64) * BT + o_t[:, None]) * HD + o_h[None, :]
    A1 = tl.load(_factor_at(fs, 0, th, BHN, BT, HD), mask=h_ok[None, :], other=0.0).to(tl.float32)
    Ah = tl.load(_factor_at(fs, 1, th, BHN, BT, HD), mask=h_ok[None, :], other=0.0).to(tl.float32)
    D1 = tl.load(_factor_at(fs, 2, th, BHN, BT, HD), mask=h_ok[None, :], other=0.0).to(tl.float32)
    dH = tl.load(_factor_at(fs, 3, th, BHN, BT, HD), mask=h_ok[None, :], other=0.0).to(tl.float32)
    dP = tl.load(fdp + th, mask=h_ok[None, :], other=0.0).to(tl.float32)
    W1, W2, S1, S2 = _state_tiles(w1s, w2s, s1s, s2s, src1, src2, w1_off, w1_ok, w2_off, w2_ok, MOMENTUM)
    dW1e, dW2e, dS1e, dS2e = _state_tiles(dw1s, dw2s, ds1s, ds2s, e1, e2, w1_off, w1_ok, w2_off, w2_ok, MOMENTUM)
    return _bwd_tile_sums(A1, Ah, D1, dH, dP, W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, beta, f, gL, nL, MOMENTUM, PREC)


@triton.jit
def _hidden_sum(tiles, WHICH: tl.constexpr, COLS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                HD: tl.constexpr, BT: tl.constexpr, BHC: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Output WHICH of ``_bwd_tile_sums`` (0 SA, 2 dC1, 4 dR, 5 dq, 6 dk; [BT, COLS]) summed over every hidden tile
    of BHC (``tiles``: ``_sums_tile``'s arguments but the tile's index and the constants)."""
    (fs, fdp, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, i_bh, src1, src2, e1, e2, BHN, o_t, o_kb, o_vb, kb_ok,
     vb_ok, o_hh, beta, f, gL, nL) = tiles
    acc = tl.zeros([BT, COLS], dtype=tl.float32)
    NHC: tl.constexpr = (HD + BHC - 1) // BHC
    for jj in range(NHC):
        acc += _sums_tile(fs, fdp, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, i_bh, jj, src1, src2, e1, e2, BHN, o_t,
                          o_kb, o_vb, kb_ok, vb_ok, o_hh, beta, f, gL, nL, K, V, HD, BT, BHC, MOMENTUM, PREC)[WHICH]
    return acc


@triton.jit
def _sums_program(p, i_bh, r, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre, fs, fdp, sums, s_src, e, NS, BHN,
                  K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, BHC: tl.constexpr, BKO: tl.constexpr, BVO: tl.constexpr, MOMENTUM: tl.constexpr,
                  PREC: tl.constexpr):
    """One output block of the backward's sums over the hidden dim, contracted over all of it from pass 2's factors
    (fs, fdp) on hidden tiles of BHC, into batch*head i_bh's record (``_sums_base``) of chunk record r: block p = 0:
    SA; 1: dC1; then column blocks of BKO of dq (BK / BKO blocks) and of dk, and of BVO of dR (BV / BVO). Padded
    columns are written too (as 0). Record r reads the factors at fs + r [4, BHN, BT, HD], the start slot s_src + r,
    ``_prep`` record r * BHN + i_bh and writes record r of sums (r = 0 on a 2-D grid: the caller's chunk)."""
    NKO: tl.constexpr = BK // BKO
    NVO: tl.constexpr = BV // BVO
    fs += r.to(tl.int64) * 4 * BHN * BT * HD
    sums += r.to(tl.int64) * BHN * (2 * BT * BT + BT * BV + 2 * BT * BK)
    o_t, o_hh = tl.arange(0, BT), tl.arange(0, BHC)
    beta, f, _, gL, nL, _, _, _ = _load_rows(_pre_base(pre, r * BHN + i_bh, BT, BV), o_t, BT, BV)
    src1, src2 = _slot_offsets(i_bh, s_src + r, NS, K, V, HD)
    e1, e2 = _slot_offsets(i_bh, e, 2, K, V, HD)
    out = _sums_base(sums, i_bh, BT, BK, BV)
    q_blk = p - 2  # dq / dk column block
    v_blk = p - 2 - 2 * NKO  # dR column block
    # (block offsets clamped into range for every program: a branch's unused outputs read in-bounds memory)
    o_kb = (tl.maximum(q_blk, 0) % NKO) * BKO + tl.arange(0, BKO)
    o_vb = tl.minimum(tl.maximum(v_blk, 0), NVO - 1) * BVO + tl.arange(0, BVO)
    kb_ok, vb_ok = o_kb < K, o_vb < V
    bb = o_t[:, None] * BT + o_t[None, :]
    tiles = (fs, fdp, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, i_bh, src1, src2, e1, e2, BHN, o_t, o_kb, o_vb,
             kb_ok, vb_ok, o_hh, beta, f, gL, nL)
    if p == 0:
        tl.store(out + bb, _hidden_sum(tiles, 0, BT, K, V, HD, BT, BHC, MOMENTUM, PREC))
    elif p == 1:
        tl.store(out + BT * BT + bb, _hidden_sum(tiles, 2, BT, K, V, HD, BT, BHC, MOMENTUM, PREC))
    elif q_blk < NKO:
        tl.store(out + 2 * BT * BT + BT * BV + o_t[:, None] * BK + o_kb[None, :],
                 _hidden_sum(tiles, 5, BKO, K, V, HD, BT, BHC, MOMENTUM, PREC))
    elif q_blk < 2 * NKO:
        tl.store(out + 2 * BT * BT + BT * BV + BT * BK + o_t[:, None] * BK + o_kb[None, :],
                 _hidden_sum(tiles, 6, BKO, K, V, HD, BT, BHC, MOMENTUM, PREC))
    else:
        tl.store(out + 2 * BT * BT + o_t[:, None] * BV + o_vb[None, :],
                 _hidden_sum(tiles, 4, BVO, K, V, HD, BT, BHC, MOMENTUM, PREC))


@_chunk_kernel("s_src", "e")
def _bwd_sums(w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre, fs, fdp, sums, s_src, e, NS, BHN,
              K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
              BV: tl.constexpr, BHC: tl.constexpr, BKO: tl.constexpr, BVO: tl.constexpr, MOMENTUM: tl.constexpr,
              PREC: tl.constexpr, CARRY: tl.constexpr, PDL: tl.constexpr):
    """The backward's sums over the hidden dim of one chunk (``_sums_program``; program (p, i_bh): block p): all
    its blocks (``sums_programs``), or with CARRY (``split_sums``) only those that the end state's gradient enters, dk
    and dR (``_bwd_sums_read`` formed the others before the loop). (The carry scalars' gradients are sums over the
    whole state, 1.5 MB per batch*head at the bench shape: pass 2 forms them on its tiles instead, ``_pass2``.)"""
    _pdl_start(PDL)
    p = tl.program_id(0)
    if CARRY:
        p += 2 + BK // BKO
    _sums_program(p, tl.program_id(1), tl.program_id(2), w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre, fs, fdp,
                  sums, s_src, e, NS, BHN, K, V, HD, BT, BK, BV, BHC, BKO, BVO, MOMENTUM, PREC)


@triton.jit
def _bwd_sums_read(w1s, w2s, s1s, s2s, pre, rf, sums, NS, BHN,
                   K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, BHC: tl.constexpr, BKO: tl.constexpr, BVO: tl.constexpr,
                   MOMENTUM: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr):
    """The blocks of the backward's sums that the end state's gradient does not enter (SA, dC1 and dq's column
    blocks: ``_sums_program``'s first 2 + BK / BKO) of every chunk at once, before the chunk loop (``split_sums``).
    Program (p, i_bh, c): block p of chunk c, from ``_bwd_read``'s factors rf [NT, 4, BHN, BT, HD], the chunk-start
    slot c and every chunk's ``_prep`` records, into chunk c's record of sums [NT, BHN, sums_size]."""
    _pdl_start(PDL)
    p = tl.minimum(tl.program_id(0), 1 + BK // BKO)  # (= program_id; the bound lets the compiler drop dk, dR)
    # (the end gradient's slots, dP and the end slot: unread stand-ins, as the read blocks do not involve them)
    _sums_program(p, tl.program_id(1), tl.program_id(2), w1s, w2s, s1s, s2s, w1s, w2s, s1s, s2s,
                  pre, rf, rf, sums, 0, 0, NS, BHN, K, V, HD, BT, BK, BV, BHC, BKO, BVO, MOMENTUM, PREC)


def sums_programs(BK: int, BV: int, part: str = "all") -> int:
    """Programs per batch*head of a ``_sums_program`` launch (``_sums_blocks``): "all" blocks (SA, dC1, the column
    blocks of dq, dk and dR), the "read" ones (SA, dC1, dq: ``_bwd_sums_read``) or the "carry" ones (dk, dR)."""
    BKO, BVO = _sums_blocks(BK, BV)
    read, carry = 2 + BK // BKO, BK // BKO + BV // BVO
    return {"all": read + carry, "read": read, "carry": carry}[part]


@triton.jit
def _row_sums(prow, i_bh, o_t, BHN, BT: tl.constexpr, NH: tl.constexpr, BR: tl.constexpr):
    """Pass 2's row partials summed over the NH hidden tiles: (dbeta, df, dgam, dgL, dnL) at the BR rows o_t of the
    chunk (a caller's unused ones are dead code)."""
    dbeta = tl.zeros([BR], dtype=tl.float32)
    df, dgam, dgL, dnL = dbeta, dbeta, dbeta, dbeta
    for jj in range(NH):
        rw = _prow_base(prow, jj * BHN + i_bh, BT) + o_t
        dbeta += tl.load(rw)
        df += tl.load(rw + BT)
        dgam += tl.load(rw + 2 * BT)
        dgL += tl.load(rw + 3 * BT)
        dnL += tl.load(rw + 4 * BT)
    return dbeta, df, dgam, dgL, dnL


@triton.jit
def _carry_sums(prow, i_bh, BHN, BT: tl.constexpr, NH: tl.constexpr):
    """Pass 2's parts of the carry scalars' gradients summed over the NH hidden tiles: d beta_L, d f_L, d m_L
    (``_end_grad_scalars``: <dW', W>, <dW', S>, <dS', S> over the whole state)."""
    dbL = tl.zeros([], dtype=tl.float32)
    dfL, dmL = dbL, dbL
    for jj in range(NH):
        sc = _prow_base(prow, jj * BHN + i_bh, BT) + 5 * BT
        dbL += tl.load(sc)
        dfL += tl.load(sc + 1)
        dmL += tl.load(sc + 2)
    return dbL, dfL, dmL


@triton.jit
def _bwd_head_dy(SAT, dR, b_do, b_v, b_d, b_k, Y0, GT, gam, w, b, t_ok, v_ok, o_r, o_t, V: tl.constexpr,
                 BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr, RES: tl.constexpr,
                 DECAYED: tl.constexpr, PREC: tl.constexpr, LN_EPS: tl.constexpr):
    """``_bwd_chunk_dy`` through the LayerNorm head (docs/kernels-ln-head.md). From dR, the gradient at the record
    d = rstd P s (s = w R_y, R_y = dl/dy), less the read's part: the gradient at the head's input u = gamma Y0 (what
    ``_bwd_chunk_dy`` calls dY), dv, the Huber deltas' gradient, dY's part of dgamma, the gradient at y (the
    residual's part of dk) and the rows of the head's dw and db. d depends on u through xhat and rstd as well:
    dL/drstd = <g_d, d> / rstd, dL/dxhat gets -rstd (mean(s xhat) g_d + s mean(g_d xhat)) besides w dL/dy."""
    g_d = _bwd_chunk_dr(SAT, dR, b_do, GT, t_ok, o_r, o_t, PREC, True)
    xhat, rstd, y, R = _head_forward(Y0, b_k, b_v, b_d, gam, w, b, v_ok, V, BIAS, P, SMOOTH, EPS, RES, LN_EPS)
    s = w[None, :] * R
    g_s = _ln_vjp(g_d, xhat, rstd, v_ok, V)
    g_y, dV, dd = bias_rows_bwd(y, b_v, b_d, w[None, :] * g_s, BIAS, P, SMOOTH, EPS)
    g_y = tl.where(t_ok[:, None], g_y, 0.0)
    s_mean = tl.sum(s * xhat, axis=1) / V
    g_mean = tl.sum(g_d * xhat, axis=1) / V
    g_xhat = w[None, :] * g_y - rstd[:, None] * (s_mean[:, None] * g_d + s * g_mean[:, None])
    g_rstd = tl.sum(g_d * _ln_vjp(s, xhat, rstd, v_ok, V), axis=1) / rstd
    g_u = _ln_vjp(g_xhat, xhat, rstd, v_ok, V) - (g_rstd * rstd * rstd / V)[:, None] * xhat
    g_u = tl.where(t_ok[:, None], g_u, 0.0)
    dgam = tl.zeros_like(gam)
    if DECAYED:
        dgam = tl.sum(g_u * Y0, axis=1)
    return g_u, dV, dd, dgam, g_y, g_s * R + g_y * xhat


@triton.jit
def _mid_vjp_rows(k, v, delta, nw, nb, hin, base, out, prow, gdy, dyb, gin, dv, ddelta, b_do, rb, i_bh, c, T, BHN, L,
                  g0, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BTR: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, NH: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr,
                  SMOOTH: tl.constexpr, EPS: tl.constexpr, RES: tl.constexpr, DECAYED: tl.constexpr,
                  MOMENTUM: tl.constexpr, PREC: tl.constexpr, NORM: tl.constexpr, LN_EPS: tl.constexpr):
    """``_bwd_mid``'s bias VJP (``_bwd_chunk_dy``) on the rows [rb BTR, (rb + 1) BTR) of chunk c: row-wise but for
    (G . SA)^T dO's sum over the chunk's tokens (b_do: all of them)."""
    p_g, o_r, r_idx, r_ok, rtv, rtv_ok, b_k, b_v, b_d = _row_inputs(k, v, delta, i_bh, rb, c, T, H, K, V, BT, CS, BTR,
                                                                     BK, BV, BIAS)
    o_t, o_v = tl.arange(0, BT), tl.arange(0, BV)
    rv = o_r[:, None] * BV + o_v[None, :]
    Y0 = tl.load(base + 2 * BT * BT + BT * BV + rv)
    _, _, gam, _, _, _, _, _ = _load_rows(base, o_r, BT, BV)  # (gamma at these rows)
    dbeta, df, dgam, _, dnL = _row_sums(prow, i_bh, o_r, BHN, BT, NH, BTR)
    dR = tl.load(out + 2 * BT * BT + rv)
    SAT = out + o_t[None, :] * BT + o_r[:, None]
    GT = tl.load(base + BT * BT + o_r[:, None] * BT + o_t[None, :])
    if NORM:  # (and the row block's parts of the head's dw, db -> hin)
        v_ok = o_v < V
        w, b = _head_params(nw, nb, i_bh, o_v, v_ok, H, V)
        dY, dV, dd, dgam_y, dres, dw_rows = _bwd_head_dy(SAT, dR, b_do, b_v, b_d, b_k, Y0, GT, gam, w, b, r_ok, v_ok,
                                                         o_r, o_t, V, BIAS, P, SMOOTH, EPS, RES, DECAYED, PREC, LN_EPS)
        rec = hin + (i_bh.to(tl.int64) * (BT // BTR) + rb) * 2 * BV
        tl.store(rec + o_v, tl.sum(dw_rows, axis=0))
        tl.store(rec + BV + o_v, tl.sum(dres, axis=0))
    else:
        dY, dV, dd, dgam_y = _bwd_chunk_dy(SAT, dR, b_do, b_v, b_d, b_k, Y0, GT, gam, r_ok, o_r, o_t, BIAS, P, SMOOTH,
                                           EPS, RES, DECAYED, PREC, True)
        dres = dY
    if DECAYED:
        dbeta += dgam + dgam_y
    r_L = o_r == L
    dbL, dfL, dmL = _carry_sums(prow, i_bh, BHN, BT, NH)
    dbeta += tl.where(r_L, dbL, 0.0)
    if MOMENTUM:
        df += tl.where(r_L, dfL, 0.0)
    tl.store(dv + rtv, dV.to(dv.dtype.element_ty), mask=rtv_ok)
    if BIAS == 3:
        tl.store(ddelta + p_g + r_idx * H, dd, mask=r_ok)
    rows = (i_bh.to(tl.int64) * BT + o_r[:, None]) * BV + o_v[None, :]
    tl.store(gdy + rows, gam[:, None] * dY)
    if RES:
        tl.store(dyb + rows, dres)
    tl.store(gin + g0 + BT * BT + o_r, dbeta)
    tl.store(gin + g0 + BT * BT + BT + o_r, df)
    tl.store(gin + g0 + BT * BT + 2 * BT + o_r, dnL)
    tl.store(gin + g0 + BT * BT + 3 * BT, dmL)  # (the same scalar from every row block)


@_chunk_kernel("c")
def _bwd_mid(q, k, v, do, delta, nw, nb, hin, pre, sums, prow, gdy, dyb, dkacc, gin, dq, dv, ddelta, c, T, BHN,
             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr,
             BK: tl.constexpr, BV: tl.constexpr, NH: tl.constexpr,
             BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr,
             RES: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr,
             BTR: tl.constexpr, NORM: tl.constexpr, LN_EPS: tl.constexpr, READ_RES: tl.constexpr, R16: tl.constexpr,
             PDL: tl.constexpr):
    """Between the tile passes, from ``_bwd_sums``' contractions (SA^T and dC1^T read transposed), the sums of the
    tiles' row partials and ``_prep``'s record; BT / BTR + 3 programs per batch*head:
    p < BT / BTR: the bias VJP (``_bwd_chunk_dy``) on rows [p BTR, (p + 1) BTR): dv, the Huber deltas' gradient,
           gdY = gam dY (-> gdy), dY (-> dyb, with the residual) and the gate inputs dbeta, df, dnL, dmL (-> gin;
           pass 3 adds dgam);
    then 3 programs: ``_bwd_chunk_dg``'s gate input dG (-> gin), dq, dk's intra-chunk part (-> dkacc).
    gin [BHN, BT * BT + 4 * BT] = dG, dbeta, df, dnL, dmL (padded to keep each record 16-byte aligned). With NORM
    (the LayerNorm head) the bias VJP goes through the head (``_bwd_head_dy``), and hin [BHN, BT / BTR, 2, BV] gets
    each row block's parts of the head's dw, db; do is then the gradient at the read's head input, so dq gets the
    read's residual only with READ_RES (the caller adds the raw dO itself)."""
    _pdl_start(PDL)
    p, i_bh = tl.program_id(0), tl.program_id(1)
    NRB: tl.constexpr = BT // BTR
    o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, qk_ok, p_tv, tv_ok = _token_offsets(
        i_bh, c, T, H, K, V, BT, CS, BK, BV)
    L = chunk_rows(c, T, o_t, BT, CS)[4]
    at_L = o_t == L
    base = _pre_base(pre, i_bh, BT, BV)
    out = _sums_base(sums, i_bh, BT, BK, BV)
    bb = out + o_t[:, None] * BT + o_t[None, :]
    bbt = out + o_t[None, :] * BT + o_t[:, None]
    g0 = i_bh.to(tl.int64) * (BT * BT + 4 * BT)
    b_do = tl.load(do + p_tv, mask=tv_ok, other=0.0).to(tl.float32)
    if p < NRB:  # the bias VJP on the rows [p BTR, (p + 1) BTR)
        _mid_vjp_rows(k, v, delta, nw, nb, hin, base, out, prow, gdy, dyb, gin, dv, ddelta, b_do, p, i_bh, c, T, BHN,
                      L, g0, H, K, V, BT, CS, BTR, BK, BV, NH, BIAS, P, SMOOTH, EPS, RES, DECAYED, MOMENTUM, PREC,
                      NORM, LN_EPS)
    else:  # one output of _bwd_chunk_dg per program, its operands loaded in its branch: the registers of one
        which = p - NRB  # 0 dG, 1 dq, 2 dk
        qk = out + 2 * BT * BT + BT * BV + o_t[:, None] * BK + o_k[None, :]  # _bwd_sums' dq, dk, added last
        G, GT = _pre_block(base, 0, o_t, BT), _pre_block(base, 1, o_t, BT)
        if which == 0:
            b_q = tl.load(q + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
            b_k = tl.load(k + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
            R = _load_r(base, o_t, o_v, BT, BV, R16)
            zero = tl.zeros([BT, BK], dtype=tl.float32)
            dG = _bwd_chunk_dg(bb, bb + BT * BT, bbt + BT * BT, zero, zero, b_q, b_k, b_do, R, G, GT, o_t, RES,
                               PREC, True)[0]
            dgL = _row_sums(prow, i_bh, o_t, BHN, BT, NH, BT)[3]
            tl.store(gin + g0 + o_t[:, None] * BT + o_t[None, :], dG + tl.where(at_L[:, None], dgL[None, :], 0.0))
        elif which == 1:
            b_k = tl.load(k + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
            b_dq = _bwd_chunk_dg(bb, bb + BT * BT, bbt + BT * BT, tl.load(qk), tl.load(qk), b_k, b_k, b_do, b_do,
                                 G, GT, o_t, READ_RES, PREC, True)[1]
            tl.store(dq + p_tk, b_dq, mask=qk_ok)
        else:
            b_q = tl.load(q + p_tk, mask=qk_ok, other=0.0).to(tl.float32)
            b_dk = _bwd_chunk_dg(bb, bb + BT * BT, bbt + BT * BT, tl.load(qk + BT * BK), tl.load(qk + BT * BK), b_q,
                                 b_q, b_do, b_do, G, GT, o_t, RES, PREC, True)[2]
            tl.store(dkacc + (i_bh.to(tl.int64) * BT + o_t[:, None]) * BK + o_k[None, :], b_dk)


@_chunk_kernel("c", "e", "s")
def _bwd_tile32(q, k, do, keep, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre, pre_prev, ops_prev, xs, xs_prev, fs,
                fdp, rz_prev, rrow_prev, gdy, pg3, prow, c, e, s, T, NS, BHN, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                BH: tl.constexpr, ACT: tl.constexpr, DECAYED: tl.constexpr, MOMENTUM: tl.constexpr,
                PREC: tl.constexpr, PASS2: tl.constexpr, R16: tl.constexpr, H16: tl.constexpr, TPP: tl.constexpr,
                SPLIT: tl.constexpr,
                PDL: tl.constexpr):
    """Pass 3 of chunk c for TPP hidden tiles (``_pass3``: the start-state gradient tiles into slot s), then, for c > 0
    and with PASS2 (``fuse_passes()``; then TPP = 1),
    the tile's pass 2 of chunk c - 1 (``_pass2``: records pre_prev, xs_prev), which reads that tile back as chunk c - 1's
    end-state gradient: a tile-local dependency, so one launch instead of two (a barrier orders the store and the
    reload among the program's threads). Pass 3 reads pass 2's factors of chunk c from fs before pass 2 of c - 1
    overwrites the same columns (with SPLIT, ``split_pass2``: fs is ``_bwd_read``'s record of chunk c, pass 2 of
    c - 1 its carry half, ``_pass2_carry`` from rz_prev, rrow_prev, which writes fdp and xs_prev alone). Pass 3
    forms k W1 anew even with SPLIT, where ``_bwd_read`` kept it: loaded, it took a 376 B spill stack and 3528
    instructions at sm_90 against 296 and 2496 (its elementwise chain formed in three layouts)."""
    _pdl_start(PDL)
    _pass3(q, k, do, keep, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre, xs, fs, fdp, gdy, pg3, c, c, e, s, T, NS,
           BHN, H, K, V, HD, BT, CS, BK, BV, BH, ACT, DECAYED, MOMENTUM, PREC, R16, H16, TPP)
    if PASS2 and c > 0:
        tl.debug_barrier()
        if SPLIT:
            _pass2_carry(k, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre_prev, xs_prev, fdp, rz_prev, rrow_prev,
                         prow, c - 1, c - 1, s, T, NS, BHN, H, K, V, HD, BT, CS, BK, BV, BH, ACT, DECAYED, MOMENTUM,
                         PREC, R16, H16, 1)
        else:
            _pass2(q, k, do, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre_prev, ops_prev, xs_prev, fs, fdp, prow,
                   c - 1, c - 1, s, T, NS, BHN, H, K, V, HD, BT, CS, BK, BV, BH, ACT, DECAYED, MOMENTUM, PREC, R16, H16,
                   1)


@triton.jit
def _pass3_shared(q, do, base, o_t, o_v, p_tk, qk_ok, p_tv, tv_ok, BT: tl.constexpr, BV: tl.constexpr,
                  R16: tl.constexpr, H16: tl.constexpr):
    """What pass 3's tiles of a chunk share after their first half: R, the rows beta, f, beta_L, f_L, m_L, q, dO."""
    R = _dot_input(_load_r(base, o_t, o_v, BT, BV, R16), H16)
    beta, f, _, _, _, betaL, fL, mL = _load_rows(base, o_t, BT, BV)
    b_q = _dot_input(tl.load(q + p_tk, mask=qk_ok, other=0.0), H16)
    b_do = _dot_input(tl.load(do + p_tv, mask=tv_ok, other=0.0), H16)
    return R, beta, f, betaL, fL, mL, b_q, b_do


@triton.jit
def _pass3(q, k, do, keep, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre, xs, fs, fdp, gdy, pg3, c,
           s_src, e, s, T, NS, BHN, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HD: tl.constexpr,
           BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, ACT: tl.constexpr,
           DECAYED: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr, R16: tl.constexpr, H16: tl.constexpr,
           TPP: tl.constexpr):
    """Pass 3 of hidden tile j: dZ1 = X + (gam dY W2^T) act'(Z1), gam dZ1 over X in xs (``_bwd_end`` contracts it
    with W1 for dk) and the tile's dgam (-> pg3); the tile of the start state's gradient (slot s): k^T gam dZ1 +
    A1^T gam dY (``_bwd_tile_dy``), the read's terms from pass 2's factors (``_state_grad_terms``) and the end
    gradient's carried terms (``_end_grad_terms``). Program (jp, i_bh) walks the tiles j = jp TPP ..
    (jp + 1) TPP - 1 (``bwd_tiles_per_program``), loading what they share (k, q, dO, gamma dY, R, the gate rows) once."""
    jp, i_bh = tl.program_id(0), tl.program_id(1)
    o_t, o_k, o_v, k_ok, v_ok, t_idx, t_ok, p_g, p_tk, qk_ok, p_tv, tv_ok = _token_offsets(
        i_bh, c, T, H, K, V, BT, CS, BK, BV)
    b_k, gam = _chunk_keys(k, keep, p_g, p_tk, qk_ok, t_idx, t_ok, H, BT, DECAYED)
    b_k = _dot_input(b_k, H16)
    src1, src2 = _slot_offsets(i_bh, s_src, NS, K, V, HD)
    e1, e2 = _slot_offsets(i_bh, e, 2, K, V, HD)
    st1, st2 = _slot_offsets(i_bh, s, 2, K, V, HD)
    gdY = _dot_input(tl.load(gdy + (i_bh.to(tl.int64) * BT + o_t[:, None]) * BV + o_v[None, :]), H16)
    base = _pre_base(pre, i_bh, BT, BV)
    o_hh = tl.arange(0, BH)
    # what the tile's second half reads: with one tile per program loaded there (loaded here, it stays live
    # through the first half: a 672 B spill stack per thread against 296 at sm_90), else once for all tiles
    R, beta, f, betaL, fL, mL, b_q, b_do = _pass3_shared(q, do, base, o_t, o_v, p_tk, qk_ok, p_tv, tv_ok, BT, BV, R16,
                                                                 H16)
    for jt in range(TPP):
        j = jp * TPP + jt
        o_h, h_ok, w1_off, w1_ok, w2_off, w2_ok = _tile_offsets(j, o_k, o_v, o_hh, k_ok, v_ok, V, HD, BH)
        W1, W2, S1, S2 = _state_tiles(w1s, w2s, s1s, s2s, src1, src2, w1_off, w1_ok, w2_off, w2_ok, MOMENTUM)
        th = (i_bh.to(tl.int64) * BT + o_t[:, None]) * HD + o_h[None, :]
        X = tl.load(xs + th, mask=h_ok[None, :], other=0.0)
        gdZ1, dgam_j, dW1, dW2 = _bwd_tile_dy(b_k, W1, W2, X, gdY, gam, ACT, DECAYED, PREC)
        tl.store(xs + th, gdZ1, mask=h_ok[None, :])  # (this program's own columns, read just above)
        if DECAYED:
            tl.store(pg3 + (j * BHN + i_bh).to(tl.int64) * BT + o_t, dgam_j)
        if TPP == 1:
            R, beta, f, betaL, fL, mL, b_q, b_do = _pass3_shared(q, do, base, o_t, o_v, p_tk, qk_ok, p_tv, tv_ok, BT,
                                                                 BV, R16, H16)
        Ah = tl.load(_factor_at(fs, 1, th, BHN, BT, HD), mask=h_ok[None, :], other=0.0).to(tl.float32)
        dH = tl.load(_factor_at(fs, 3, th, BHN, BT, HD), mask=h_ok[None, :], other=0.0).to(tl.float32)
        dP = tl.load(fdp + th, mask=h_ok[None, :], other=0.0).to(tl.float32)
        dW1r, dW2r, dS1r, dS2r = _state_grad_terms(b_q, b_do, R, Ah, dH, dP, beta, f, MOMENTUM, PREC)
        dW1e, dW2e, dS1e, dS2e = _state_tiles(dw1s, dw2s, ds1s, ds2s, e1, e2, w1_off, w1_ok, w2_off, w2_ok, MOMENTUM)
        dW1c, dW2c, dS1c, dS2c = _end_grad_terms(W1, W2, S1, S2, dW1e, dW2e, dS1e, dS2e, betaL, fL, mL, MOMENTUM)
        tl.store(dw1s + st1 + w1_off, dW1 + dW1r + dW1c, mask=w1_ok)
        tl.store(dw2s + st2 + w2_off, dW2 + dW2r + dW2c, mask=w2_ok)
        if MOMENTUM:
            tl.store(ds1s + st1 + w1_off, dS1r + dS1c, mask=w1_ok)
            tl.store(ds2s + st2 + w2_off, dS2r + dS2c, mask=w2_ok)


@triton.jit
def _bwd_end(eta, keep, mu, w1s, dkacc, dyb, xs, pg3, gin, dk, deta, dla, dlm, T, NS, BHN,
             H: tl.constexpr, K: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr,
             NH: tl.constexpr, BHC: tl.constexpr, RES: tl.constexpr, HAS_KEEP: tl.constexpr, DECAYED: tl.constexpr,
             MOMENTUM: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr):
    """Every chunk at once, after the chunk loop: program (p, i_bh, c) reads chunk c's records of the per-chunk
    buffers dkacc, dyb [NT, BHN, BT, BK], xs [NT, BHN, BT, HD], pg3 [NT, NH, BHN, BT], gin [NT, BHN, ..] and
    writes: p = 0: dk = its intra-chunk part [+ dY, the residual's] + sum over the hidden dim of gam dZ1 W1^T (pass
    3's gam dZ1 in xs, W1 of the chunk-start slot c, on hidden tiles of BHC); p = 1: the gate gradients from the gate
    inputs (+ pass 3's dgam)."""
    _pdl_start(PDL)
    p, i_bh, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s_src = c
    rec = c.to(tl.int64) * BHN
    dkacc += rec * BT * BK
    dyb += rec * BT * BK
    xs += rec * BT * HD
    pg3 += rec * NH * BT
    gin += rec * (BT * BT + 4 * BT)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_t, o_k, o_hh = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BHC)
    k_ok = o_k < K
    t0, t_end, t_idx, t_ok, L = chunk_rows(c, T, o_t, BT, CS)
    at_L = o_t == L
    p_g = i_b * T * H + i_h
    if p == 0:
        b_dk = tl.load(dkacc + (i_bh.to(tl.int64) * BT + o_t[:, None]) * BK + o_k[None, :])
        if RES:
            b_dk += tl.load(dyb + (i_bh.to(tl.int64) * BT + o_t[:, None]) * BK + o_k[None, :])  # K == V
        src1 = (i_bh.to(tl.int64) * NS + s_src) * K * HD  # (only W1 here: _slot_offsets' first offset)
        NHC: tl.constexpr = (HD + BHC - 1) // BHC
        for jj in range(NHC):
            o_h = jj * BHC + o_hh
            h_ok = o_h < HD
            gdZ1 = tl.load(xs + (i_bh.to(tl.int64) * BT + o_t[:, None]) * HD + o_h[None, :], mask=h_ok[None, :],
                           other=0.0)
            W1 = tl.load(w1s + src1 + o_k[:, None] * HD + o_h[None, :], mask=k_ok[:, None] & h_ok[None, :],
                         other=0.0).to(tl.float32)
            b_dk += _dot(gdZ1, tl.trans(W1), PREC)
        p_tk = (i_b * T * H + i_h) * K + t_idx[:, None] * H * K + o_k[None, :]
        tl.store(dk + p_tk, b_dk, mask=t_ok[:, None] & k_ok[None, :])
    else:
        dgam = tl.zeros([BT], dtype=tl.float32)
        if DECAYED:
            for jj in range(NH):
                dgam += tl.load(pg3 + (jj * BHN + i_bh).to(tl.int64) * BT + o_t)
        g0 = i_bh.to(tl.int64) * (BT * BT + 4 * BT)
        dG = tl.load(gin + g0 + o_t[:, None] * BT + o_t[None, :])
        dbeta = tl.load(gin + g0 + BT * BT + o_t) + dgam
        df = tl.load(gin + g0 + BT * BT + BT + o_t)
        dnL = tl.load(gin + g0 + BT * BT + 2 * BT + o_t)
        dmL = tl.load(gin + g0 + BT * BT + 3 * BT)
        eta_t, lb, beta, E, lm, m, NTm, G, f = gate_coeffs(
            eta + p_g, keep + p_g, mu + p_g, t0, t_end, H, o_t, BT, HAS_KEEP, MOMENTUM, PREC)
        ET, Nm, _ = gate_coeffs_t(eta_t, lb, lm, o_t, MOMENTUM, PREC)
        d_eta, dlb, dlm_ = gate_grads(dG, dbeta, df, dmL, dnL, eta_t, lb, beta, E, lm, m, ET, Nm, at_L, o_t,
                                      MOMENTUM, PREC)
        store_gate_grads(deta, dla, dlm, p_g + t_idx * H, t_ok, d_eta, dlb, dlm_, HAS_KEEP, MOMENTUM)


def fuse_passes() -> bool:
    """Whether the backward runs chunk c - 1's pass 2 in the launch of chunk c's pass 3 (``_bwd_tile32``) or
    launches it on its own (``MIRAS_KERNEL_MLP_FUSE_PASSES=0``): one launch more per chunk, but the fused kernel
    spills more (1592 against 800 + 800 B per thread on sm_90 under triton 3.6).

    Default: separate whenever a launch costs the host little: with the fast launch path (miras/kernels/launcher.py,
    on by default on triton >= 3.6) or with the backward replayed as a CUDA graph (``MIRAS_KERNEL_MLP_GRAPHS``): on
    an H200 fwd+bwd took 11.0 ms separate against 11.9 ms fused under graphs (GPU session 13, bf16 dots,
    benchmarks/RESULTS.md). Fused otherwise, where the host's ~46 us per plain Triton launch bounds the step."""
    graphs_on = BACKWARD_GRAPHS.setting() != 0 and BACKWARD_GRAPHS.failed is None
    return env_switch("MIRAS_KERNEL_MLP_FUSE_PASSES", not (graphs_on or cheap_launches()))


def split_pass2() -> bool:
    """``MIRAS_KERNEL_MLP_SPLIT_PASS2`` (default off): whether the backward runs pass 2 in two halves. Of pass 2's
    dots (fourteen per hidden tile with momentum), ten do not involve the end state's gradient: the forward's
    Zk = k W1, Pm = R W2^T, the read's hidden pre-activation and its backward (q W1, q S1, C1 D1, dO W2^T, dO S2^T,
    M2 A1, M2^T Ah, C1^T dH; ``mlp._bwd_tile_read``). With the switch on they run for every chunk at once in one
    launch before the chunk loop (``_bwd_read``: 16 x B*H x NT programs at the bench shape, the whole GPU), and the
    loop's pass 2 keeps the four that carry the recurrence (``mlp._bwd_tile_carry``: R dW2'^T, k dW1', R dS2'^T,
    k dS1'). The cost: the read half's records of every chunk, 4 arrays of [B*H, BT, hidden] in the factors' dtype
    and 4 in fp32 per chunk (0.8 GB at the bench shape with bf16 factors), written once and read once. Same
    products, the same sums (only the order of a few independent dots differs). Unmeasured on a GPU."""
    return env_switch("MIRAS_KERNEL_MLP_SPLIT_PASS2", False) or split_sums()


def split_sums() -> bool:
    """``MIRAS_KERNEL_MLP_SPLIT_SUMS`` (default off; turns ``split_pass2`` on too): whether the backward also forms
    the blocks of its sums over the hidden dim that the end state's gradient does not enter (SA = Ah A1^T,
    dC1 = -dH D1^T, dq's beta dH W1^T + f dH S1^T) for every chunk at once before the chunk loop
    (``_bwd_sums_read``, from ``_bwd_read``'s factors), so that the loop's ``_bwd_sums`` keeps dk and dR: 8 of its
    14 programs per batch*head at the bench shape. The cost: every chunk's sums record instead of one chunk's
    (+0.27 GB at the bench shape). Same products and sums. Unmeasured on a GPU."""
    on = env_switch("MIRAS_KERNEL_MLP_SPLIT_SUMS", False)
    if on and not env_switch("MIRAS_KERNEL_MLP_SPLIT_PASS2", True):
        raise ValueError("MIRAS_KERNEL_MLP_SPLIT_SUMS=1 needs pass 2 split (its factors of every chunk), but "
                         "MIRAS_KERNEL_MLP_SPLIT_PASS2 is off: unset it or set it to 1")
    return on


def split_read() -> bool:
    """``MIRAS_KERNEL_MLP_SPLIT_READ`` (default off): whether the training forward (the one that keeps its states for
    the backward) forms the dual-form read's hidden activation Ah = act(beta q W1 + f q S1 - C1 D1) after its chunk
    loop, for every chunk at once (``_fwd_read``: hidden tiles x B*H x NT programs, from the kept chunk-start
    states), instead of in the loop's ``_fwd_tile``. The loop then runs six of its nine dots per tile with momentum
    (four of six without: k W1, R W2^T and the state update) and keeps no q tile; it stores D1 for ``_fwd_read``
    where it stored Ah. The cost: one more factor array per chunk ([B*H, BT, hidden] in the factors' dtype, 64 MB at
    the bench shape with bf16 factors). The same products (D1 is rounded to the factors' dtype on its way, as the
    bf16 dot that takes it rounds it anyway). The forward without grad keeps the read in its loop. Unmeasured on a
    GPU."""
    return env_switch("MIRAS_KERNEL_MLP_SPLIT_READ", False)


def read_tiles_per_program(NH: int) -> int:
    """Hidden tiles per program of ``_bwd_read`` (``_tiles_per_program``; default 1)."""
    return _tiles_per_program("_bwd_read", NH)


def mlp_tiles_bwd(cfg: MLPConfig, q, k, v, eta, keep, mu, delta, saved, do, dfinal: dict):
    """Backward, same contract as miras.kernels.mlp.mlp_scan_bwd (saved: ``mlp_tiles_fwd``'s slots and ``_prep``
    records): one ``_prep_m2`` launch for every chunk, the last chunk's pass 2, three launches per chunk in reverse
    (``_bwd_sums``, ``_bwd_mid``, ``_bwd_tile32``), one ``_bwd_end`` launch for every chunk."""
    B, T, H, K = q.shape
    V, HD, BT = v.shape[-1], cfg.hidden, chunk_block(cfg.chunk)
    NT = triton.cdiv(T, cfg.chunk)
    w1s, w2s, s1s, s2s, pre, ops, *head = saved
    NS = w1s.shape[1]
    BHN = B * H
    BK, BV, BH = pow2_tile(K), pow2_tile(V), _block_h(HD, BT)
    NH = triton.cdiv(HD, BH)
    f32 = dict(device=q.device, dtype=torch.float32)
    dw1s, dw2s, ds1s, ds2s = grad = _grad_slots(cfg, q, v, dfinal)
    # every chunk's records (besides pre, the forward's _prep records that _prep_m2 completes): dZ1's pass-2 part
    # (pass 3: gamma dZ1); pass 3's dgam parts; the gate inputs (dG, dbeta, df, dnL, dmL); dk's intra-chunk part; dY
    # itself (the residual's part of dk). _bwd_end reads them after the loop. Scratch of one chunk, reused: pass 2's
    # factors (A1, Ah, D1, dH, dP) and their contractions (SA, dC1, dR, dq, dk); pass 2's partials (the rows dbeta,
    # df, dgam, dgL, dnL and the scalars d beta_L, d f_L, d m_L); gamma dY.
    xs = torch.empty(NT, BHN, BT, HD, **f32)
    pg3 = torch.empty(NT, NH, BHN, BT, **f32)
    gin = torch.empty(NT, BHN, BT * BT + 4 * BT, **f32)
    dkacc = torch.empty(NT, BHN, BT, BK, **f32)
    dyb = torch.empty(NT, BHN, BT, BV, **f32) if cfg.residual else dkacc
    fty = factors_dtype(_prec(q))
    split = split_pass2()
    if split:  # pass 2's read half for every chunk (``_bwd_read``): its factors, its records for the carry half
        rf = torch.empty(NT, 4, BHN, BT, HD, device=q.device, dtype=fty)
        rz = torch.empty(NT, 4, BHN, BT, HD, **f32)
        rrow = torch.empty(NT, NH, BHN, 2, BT, **f32)
        fdp = torch.empty(BHN, BT, HD, device=q.device, dtype=fty)
        fs_c, rz_c, rrow_c = rf.unbind(0), rz.unbind(0), rrow.unbind(0)
    else:  # one chunk's factors, reused (dP the fifth)
        fs = torch.empty(5, BHN, BT, HD, device=q.device, dtype=fty)
        fdp = fs[4]
        fs_c = rz_c = rrow_c = (fs,) * NT  # (rz, rrow: unread stand-ins)
    by_chunk = split_sums()  # every chunk's sums record (_bwd_sums_read fills their read blocks first), else one's
    sums = torch.empty(NT if by_chunk else 1, BHN, sums_size(BT, BK, BV), **f32)
    sums_c = sums.unbind(0) if by_chunk else (sums[0],) * NT
    prow = torch.empty(NH, BHN, prow_size(BT), **f32)
    gdy = torch.empty(BHN, BT, BV, **f32)
    dq, dk, dv, deta, dla, dlm, ddelta = bufs = _input_grad_buffers(cfg, q, v)
    gates = (eta, keep if keep is not None else eta, mu if mu is not None else eta)
    delta_ = delta if delta is not None else eta
    prec = _prec(q)
    # every launch's settings, built once (in the loop, each launch costs host time: ~390 per step at T=4096)
    dims = dict(H=H, K=K, V=V, BT=BT, CS=cfg.chunk, BK=BK, BV=BV, DECAYED=cfg.decayed, PREC=prec)
    rule = dict(BIAS=cfg.bias, P=cfg.p, SMOOTH=cfg.smoothing, EPS=cfg.eps, RES=cfg.residual, MOMENTUM=cfg.momentum)
    tile_kw = dict(dims, HD=HD, BH=BH, ACT=cfg.act, MOMENTUM=cfg.momentum, R16=cfg.r16,
                   H16=dot_blocks_dtype(prec) == torch.bfloat16)
    BKO, BVO = _sums_blocks(BK, BV)
    sums_kw = dict(K=K, V=V, HD=HD, BT=BT, BK=BK, BV=BV, BHC=_block_sums(HD), BKO=BKO, BVO=BVO,
                   MOMENTUM=cfg.momentum, PREC=prec)
    mid_kw = dict(dims, **rule, NH=NH, BTR=_block_rows(BT), NORM=cfg.norm, LN_EPS=LN_EPS, R16=cfg.r16,
                  READ_RES=cfg.residual and not cfg.norm)
    sums_grid = (sums_programs(BK, BV, "carry" if by_chunk else "all"), BHN)
    mid_grid = (BT // _block_rows(BT) + 3, BHN)
    do_raw = do
    if cfg.norm:  # the read's head first: from here on, do is the gradient at its input
        nw, nb, ohead = head
        hread = torch.empty(NT, BHN, 2, BV, **f32)
        do = torch.empty(B, T, H, V, **f32)
        _launch(_head_read_bwd, (BHN, NT), do_raw, ohead, nw, nb, do, hread, T, BHN, H=H, K=K, V=V, BT=BT, CS=cfg.chunk,
                BK=BK, BV=BV, LN_EPS=LN_EPS)
        hin = torch.empty(NT, BHN, BT // _block_rows(BT), 2, BV, **f32)  # the inner head's parts of dw, db
    else:
        nw = nb = hin = eta  # (unread stand-ins)
    _launch(_prep_m2, (BHN, NT), do, pre, ops, T, BHN, H=H, K=K, V=V, BT=BT, CS=cfg.chunk, BK=BK, BV=BV, PREC=prec,
            R16=cfg.r16)
    pre_c, ops_c, xs_c, pg3_c, gin_c, dkacc_c, dyb_c = (x.unbind(0) for x in (pre, ops, xs, pg3, gin, dkacc, dyb))
    if split:
        tppr = read_tiles_per_program(NH)
        _launch(_bwd_read, (NH // tppr, BHN, NT), q, k, do, w1s, w2s, s1s, s2s, pre, ops, rf, rz, rrow, T, NS, BHN,
                H=H, K=K, V=V, HD=HD, BT=BT, CS=cfg.chunk, BK=BK, BV=BV, BH=BH, ACT=cfg.act, MOMENTUM=cfg.momentum,
                PREC=prec, R16=cfg.r16, H16=tile_kw["H16"], TPP=tppr)
    if by_chunk:
        _launch(_bwd_sums_read, (sums_programs(BK, BV, "read"), BHN, NT), w1s, w2s, s1s, s2s, pre, rf, sums, NS, BHN,
                config_env=SUMS_CONFIG, **sums_kw)
    fused = fuse_passes()
    tpp2 = pass2_tiles_per_program(NH)
    pass2_grid = (NH // tpp2, BHN)
    _launch(_bwd_tile2, pass2_grid, q, k, do, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre_c[NT - 1],
            ops_c[NT - 1], xs_c[NT - 1], fs_c[NT - 1], fdp, rz_c[NT - 1], rrow_c[NT - 1], prow, NT - 1, NT - 1,
            NT % 2, T, NS, BHN, **tile_kw, TPP=tpp2, SPLIT=split)
    # the loop's launches, bound once (miras/kernels/launcher.py: less host time per launch)
    bwd_sums = _launcher(_bwd_sums, sums_grid, SUMS_CONFIG, **sums_kw, CARRY=by_chunk)
    bwd_mid = _launcher(_bwd_mid, mid_grid, **mid_kw)
    tpp = bwd_tiles_per_program(NH, fused)
    bwd_tile32 = _launcher(_bwd_tile32, (NH // tpp, BHN), **tile_kw, PASS2=fused, TPP=tpp, SPLIT=split)
    bwd_tile2 = _launcher(_bwd_tile2, pass2_grid, **tile_kw, TPP=tpp2, SPLIT=split)
    for c in range(NT - 1, -1, -1):
        e, s = (c + 1) % 2, c % 2  # state-gradient slots: the chunk's end (read) and start (written)
        bwd_sums(w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre_c[c], fs_c[c], fdp, sums_c[c], c, e, NS, BHN)
        bwd_mid(q, k, v, do, delta_, nw, nb, hin[c] if cfg.norm else hin, pre_c[c], sums_c[c], prow, gdy, dyb_c[c],
                dkacc_c[c], gin_c[c], dq, dv, ddelta, c, T, BHN)
        prev = max(c - 1, 0)  # (pass 2 of chunk c - 1 in the same launch; none after chunk 0)
        bwd_tile32(q, k, do, gates[1], w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre_c[c], pre_c[prev],
                   ops_c[prev], xs_c[c], xs_c[prev], fs_c[c], fdp, rz_c[prev], rrow_c[prev], gdy, pg3_c[c], prow, c, e,
                   s, T, NS, BHN)
        if c > 0 and not fused:
            bwd_tile2(q, k, do, w1s, w2s, s1s, s2s, dw1s, dw2s, ds1s, ds2s, pre_c[prev], ops_c[prev], xs_c[prev],
                      fs_c[prev], fdp, rz_c[prev], rrow_c[prev], prow, prev, prev, s, T, NS, BHN)
    _launch(_bwd_end, (2, BHN, NT), *gates, w1s, dkacc, dyb, xs, pg3, gin, dk, deta, dla, dlm, T, NS, BHN,
            config_env=SUMS_CONFIG, H=H, K=K,
            HD=HD, BT=BT, CS=cfg.chunk, BK=BK, NH=NH, BHC=_block_sums(HD), RES=cfg.residual, HAS_KEEP=cfg.has_keep,
            DECAYED=cfg.decayed, MOMENTUM=cfg.momentum, PREC=prec)
    if cfg.norm and cfg.residual:  # the read's residual, on the raw output gradient (K == V)
        dq.add_(do_raw)
    grads = _input_grads(cfg, q, k, keep, mu, bufs, grad)
    if not cfg.norm:
        return grads
    parts = hread.view(NT, B, H, 2, BV).sum((0, 1)) + hin.view(NT, B, H, -1, 2, BV).sum((0, 1, 3))  # [H, 2, BV]
    return (*grads, parts[:, 0, :V].contiguous(), parts[:, 1, :V].contiguous())
