"""Shared Triton pieces of the memory-update kernels: gate coefficients of a chunk, bias output-gradient rows.

Every kernel of the family walks the chunks of one (batch, head, V-tile) in order and needs, per chunk of b tokens
(Titans Eq. 16 / Miras Eq. 28 with the gradients taken at the chunk-start state, see shared/reference
deep-memory-dual-form.md and papers.md §1.4.1):

    beta_t = prod_{l<=t} alpha_l,   E[t, r] = prod_{l=r+1..t} alpha_l  (r <= t),   m_r = prod_{l<=r} mu_l
    N[j, r] = eta_j prod_{l=j+1..r} mu_l  (r >= j; GD: N = diag(eta)),   G = E N^T,   f = E m

so that  W_t = beta_t W_0 + f_t S_0 - sum_j G[t, j] grad_j  and  S_t = m_t S_0 - sum_j N[j, t] grad_j.
``gate_coeffs`` builds them from log-cumsums; ``bias_rows`` is the attentional bias's output gradient
R = dl/dy (one row per token) and ``bias_rows_bwd`` its vector-Jacobian product. Adding a bias = one branch in each.

Bias codes (constexpr BIAS): 0 dot (R = -v), 1 l2 (R = y - v), 2 lp (Miras Eq. 10-11 smoothed:
R = p tanh(a r) (r^2 + eps)^((p-1)/2)), 3 huber (Miras Eq. 16: R = r if ||r||_2 <= delta else delta tanh(a r)).
LN_HEAD + 0..3: that bias behind a LayerNorm head on the prediction (TTT-Linear's memory x + LN(x W) w + b, Sun et
al. 2024; ``ln_rows``): the kernels' delta pointer then holds the head's weight w [H, V], and ddelta takes the rows
of its gradient [B, T, H, V]. Huber behind the head (code 7) needs both: its delta buffer is w [H, V] followed by
the deltas [B, T, H] (``huber_deltas``), and its ddelta the weight's rows [B, T, H, V] followed by the deltas'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from miras.components.memory import LN_EPS as _MEMORY_LN_EPS

BIAS_CODES = {"dot": 0, "l2": 1, "lp": 2, "huber": 3}
LAG_CODES = {"elastic": 1, "kl": 2}  # lag-token retentions (``lag_carry``)
LN_HEAD = 4  # added to the code of the bias behind a LayerNorm head (dot, l2, lp, huber)
HUBER_LN = LN_HEAD + BIAS_CODES["huber"]  # (7: ``huber_deltas`` names it as a literal)
LN_EPS = tl.constexpr(_MEMORY_LN_EPS)  # the LayerNorm's epsilon, the memory components' own

# triton decides at decoration time whether @triton.jit builds a GPU kernel or an interpreted one: freeze it here
try:
    from triton import knobs as _knobs

    _INTERPRET = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # triton < 3.4 has no knobs
    _INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@dataclass(frozen=True)
class RuleConfig:
    """The static choices of the bias, retention and learner axes that every memory kernel takes as constexprs:
    chunk, bias code (BIAS_CODES), Lp p / smoothing / eps, whether there is a keep gate, the decayed gradient point,
    momentum. The kernel configs (``LinearConfig``, ``MLPConfig``) extend it."""

    chunk: int
    bias: int  # BIAS_CODES
    p: float = 2.0
    smoothing: float = 10.0
    eps: float = 1e-6
    has_keep: bool = False
    decayed: bool = False
    momentum: bool = False
    lq: float = 0.0  # Lq retention's q (Moneta; ``lq_scale``), 0: none
    lq_eps: float = 1e-6
    lag: int = 0  # lag-token retention (``lag_carry``): 0 none, 1 elastic net, 2 KL
    lag_scale: float = 1.0  # KL's c
    lag_rows: int = 1  # the rows of each chunk's lag step: its first token (the omega bias' sub-tokens: its window)

    @staticmethod
    def choices(spec) -> dict:
        """The fields above from a MemorySpec."""
        from miras.ops_common import required_gates

        bias, ret, learner = spec.bias, spec.retention, spec.learner
        gated = "keep" in required_gates(spec)  # the keep gate alpha_t: A_t = alpha_t A_{t-1} + update
        return dict(chunk=learner.chunk_size, bias=BIAS_CODES[bias.kind], p=float(getattr(bias, "p", 2.0)),
                    smoothing=float(getattr(bias, "smoothing", 10.0)), eps=float(getattr(bias, "eps", 1e-6)),
                    has_keep=gated, decayed=gated and getattr(ret, "grad_at", "previous") == "decayed",
                    momentum=learner.kind == "momentum",
                    lq=float(ret.q) if ret.kind == "lq" else 0.0, lq_eps=float(getattr(ret, "eps", 1e-6)),
                    lag=LAG_CODES.get(ret.kind, 0), lag_scale=float(getattr(ret, "scale", 1.0)))  # fmt: skip


def interpreting() -> bool:
    """True when these kernels were built for Triton's numpy interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRET


try:  # grid dependency control (Hopper's programmatic dependent launch), triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait

    HAS_GDC = True
except ImportError:
    _gdc_wait = _gdc_launch_dependents = None
    HAS_GDC = False


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """With programmatic dependent launch (PDL, ``miras.kernels.mlp.launch_pdl``): wait until the previous kernel in
    the stream has finished and its writes are visible (griddepcontrol.wait), then let the next kernel's programs be
    scheduled once every program of this one has started (griddepcontrol.launch_dependents: they take the SMs this
    kernel's last wave leaves free and wait there in turn). A PDL kernel's programs may be scheduled while the
    previous kernel still runs, so every PDL kernel calls this first, before any memory access. Without PDL nothing
    (the interpreter has no inline assembly)."""
    if PDL:
        _gdc_wait()
        _gdc_launch_dependents()


def dot_prec(x: torch.Tensor) -> str:
    """The linear families' dot precision for inputs like x: exact fp32 in the interpreter; 3xTF32 (~fp32 accuracy on
    tensor cores) for fp32 inputs on GPU (the 'ieee' FMA path compiles for minutes and spills); bf16 operands for
    bf16/fp16 inputs (fp32 accumulation)."""
    if interpreting():
        return "ieee"
    return "tf32x3" if x.dtype == torch.float32 else "bf16"


def pow2_tile(n: int) -> int:
    """Tile size for a head dim: the next power of two, at least 16 (tl.dot needs dims >= 16)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation: bf16 operands when PREC == "bf16", else tl.dot's input_precision=PREC (an operand
    held in bf16 beside an fp32 one, ``mlp_tiles.dot_blocks_dtype``, is widened to fp32)."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif a.dtype != b.dtype:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _tanh(x):
    # overflow-safe tanh from one exp
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _row_select(X, o_t, idx):
    """Row ``idx`` of a [BT, N] block as a [N] vector (idx is a runtime scalar)."""
    return tl.sum(tl.where(o_t[:, None] == idx, X, 0.0), axis=0)


@triton.jit
def _vec_select(x, o_t, idx):
    """Entry ``idx`` of a [BT] vector as a scalar."""
    return tl.sum(tl.where(o_t == idx, x, 0.0), axis=0)


def chunk_block(chunk: int) -> int:
    """Rows of the block that holds one chunk of ``chunk`` tokens in the kernels: the chunk itself when it is a power
    of two of at least 16, else the next such (tl.dot needs dims >= 16). Rows past the chunk are padding, masked like
    the tokens past the end of the sequence."""
    return pow2_tile(chunk)


@triton.jit
def chunk_rows(c, T, o_t, BT: tl.constexpr, CS: tl.constexpr):
    """Chunk c's tokens in rows o_t of its block of BT rows (``chunk_block``): the chunk holds tokens c*CS .. c*CS +
    CS - 1 (fewer at the end of the sequence) in its first rows; rows past them are padding. Returns (t0, t_end,
    t_idx, t_ok, L): first token, one past the last real one, every row's token index, the rows' mask, and the row
    of the last real token."""
    t0 = c * CS
    t_idx = t0 + o_t
    if CS == BT:  # (no padding rows but the sequence's end: one scalar fewer live in the tile kernels, sm_90)
        t_end = T
    else:
        t_end = tl.minimum(T, t0 + CS)
    return t0, t_end, t_idx, t_idx < t_end, tl.minimum(T - t0, CS) - 1


@triton.jit
def gate_coeffs(p_eta, p_keep, p_mu, t0, t_end, stride_t, o_t,
                BT: tl.constexpr, HAS_KEEP: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Gate coefficients of the chunk of tokens t0 .. t_end - 1 in a block of BT rows (pointers already offset to
    (b, h); ``chunk_rows``).

    Padding rows (t >= t_end) get eta = 0, alpha = mu = 1. Returns
    (eta, lb, beta, E, lm, m, NT, G, f) where NT[r, j] = N[j, r] (so G = E @ NT), all fp32;
    for GD lm = 0, m = 1, NT = diag(eta) and f = 0.
    """
    t_idx = t0 + o_t
    t_ok = t_idx < t_end
    eta = tl.load(p_eta + t_idx * stride_t, mask=t_ok, other=0.0).to(tl.float32)
    causal = o_t[:, None] >= o_t[None, :]
    if HAS_KEEP:
        alpha = tl.load(p_keep + t_idx * stride_t, mask=t_ok, other=1.0).to(tl.float32)
        lb = tl.cumsum(tl.log(alpha), axis=0)
    else:
        lb = tl.zeros([BT], dtype=tl.float32)
    beta = tl.exp(lb)
    E = tl.where(causal, tl.exp(tl.where(causal, lb[:, None] - lb[None, :], 0.0)), 0.0)
    if MOMENTUM:
        mu = tl.load(p_mu + t_idx * stride_t, mask=t_ok, other=1.0).to(tl.float32)
        lm = tl.cumsum(tl.log(mu), axis=0)
        m = tl.exp(lm)
        NT = tl.where(causal, tl.exp(tl.where(causal, lm[:, None] - lm[None, :], 0.0)), 0.0) * eta[None, :]
        G = _dot(E, NT, PREC)
        f = tl.sum(E * m[None, :], axis=1)
    else:
        lm = tl.zeros([BT], dtype=tl.float32)
        m = tl.full([BT], 1.0, dtype=tl.float32)
        NT = tl.where(o_t[:, None] == o_t[None, :], eta[None, :], 0.0)
        G = E * eta[None, :]
        f = tl.zeros([BT], dtype=tl.float32)
    return eta, lb, beta, E, lm, m, NT, G, f


@triton.jit
def gate_grads(dG, dbeta, df, dmL, dnL, eta_t, lb, beta, E, lm, m, ET, Nm, at_L, o_t,
               MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Gate gradients from those of the coefficients (G = E N^T, f = E m, beta; papers.md §1.4.1): returns
    (d eta, d log-alpha increments, d log-mu increments) per token; the caller takes the reverse cumsums
    (``store_gate_grads``). dG must be causal; dmL / dnL are the gradients of m_L and of row L of N^T (momentum
    only); ET, Nm come from ``gate_coeffs_t`` (read with momentum only):

        dN^T = E^T dG (+ the S_end row), dE = dG N + df m^T, dm = E^T df, then the log-cumsum chains."""
    if MOMENTUM:
        dNT = _dot(ET, dG, PREC) + tl.where(at_L[:, None], dnL[None, :], 0.0)
        dE = _dot(dG, Nm, PREC) + df[:, None] * m[None, :]
        dm = tl.sum(E * df[:, None], axis=0) + tl.where(at_L, dmL, 0.0)
        causal = o_t[:, None] >= o_t[None, :]
        Pm = tl.where(causal, tl.exp(tl.where(causal, lm[:, None] - lm[None, :], 0.0)), 0.0)  # NT = Pm * eta_j
        d_eta = tl.sum(dNT * Pm, axis=0)
        X = dNT * Pm * eta_t[None, :]
        dlm_ = tl.sum(X, axis=1) - tl.sum(X, axis=0) + dm * m
    else:
        d_eta = tl.sum(dG * E, axis=0)
        dE = dG * eta_t[None, :]
        dlm_ = tl.zeros([o_t.shape[0]], dtype=tl.float32)
    Y2 = dE * E
    dlb = tl.sum(Y2, axis=1) - tl.sum(Y2, axis=0) + dbeta * beta
    return d_eta, dlb, dlm_


@triton.jit
def store_gate_grads(deta, dla, dlm, p_tg, t_ok, d_eta, dlb, dlm_,
                     HAS_KEEP: tl.constexpr, MOMENTUM: tl.constexpr):
    """Store a chunk's gate gradients from ``gate_grads``: d eta, and d log alpha, d log mu as reverse cumsums of
    their increments. p_tg: the chunk's tokens' offsets into the [B, T, H] gate tensors."""
    tl.store(deta + p_tg, d_eta, mask=t_ok)
    if HAS_KEEP:
        tl.store(dla + p_tg, tl.cumsum(dlb, axis=0, reverse=True), mask=t_ok)
    if MOMENTUM:
        tl.store(dlm + p_tg, tl.cumsum(dlm_, axis=0, reverse=True), mask=t_ok)


@triton.jit
def gate_coeffs_t(eta_t, lb, lm, o_t, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Transposed gate coefficients (ET[r, t] = E[t, r], Nm[j, r] = N[j, r], GT[j, t] = G[t, j]), built directly:
    no tl.trans of dot results (Hopper codegen hazard, fla #640)."""
    causal_t = o_t[:, None] <= o_t[None, :]
    ET = tl.where(causal_t, tl.exp(tl.where(causal_t, lb[None, :] - lb[:, None], 0.0)), 0.0)
    if MOMENTUM:
        Nm = tl.where(causal_t, tl.exp(tl.where(causal_t, lm[None, :] - lm[:, None], 0.0)), 0.0) * eta_t[:, None]
        GT = _dot(Nm, ET, PREC)
    else:
        Nm = ET
        GT = ET * eta_t[:, None]
    return ET, Nm, GT


@triton.jit
def _abs_pow(W, E: tl.constexpr):
    """|W|^E elementwise (0 where W = 0) for a real exponent E > 0."""
    a = tl.abs(W)
    return tl.where(a > 0, tl.exp(E * tl.log(tl.maximum(a, 1e-30))), 0.0)


# Lag-token retentions (Miras Eq. 30): at the first token of each chunk the carried state takes a non-linear step,
# the rest of the chunk runs linearly from it; its gradients stay at the chunk-start state (the chunked path's
# ``ops_chunked``). LAG: 1 elastic net (Miras Eq. 22), 2 KL (Memora, Miras Eq. 21, 27).
TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal: KL's log reads max(W, TINY)


@triton.jit
def lag_carry(W, gk, a0, gam, k_ok, v_ok, LAG: tl.constexpr, SCALE: tl.constexpr):
    """The state a chunk carries after its lag token, from its start state W [BK, BV], the lag token's learning-rate
    weighted gradient gk = eta_0 k_0^T r_0 (its bias row at W; ``linear._lag_grad``) and its keep a0:

        elastic  S_gam(a0 W - gk),  S_gam(z) = sign(z) relu(|z| - gam)        (Miras Eq. 22)
        KL       SCALE softmax_V(a0 log max(W, TINY) - gk)                    (Memora, Miras Eq. 21, 27)

    KL's softmax runs over the whole row (all of V in the block). Padding rows and columns come back 0."""
    if LAG == 1:
        z = a0 * W - gk
        Wc = tl.where(z > gam, z - gam, tl.where(z < -gam, z + gam, 0.0))
    else:
        z = tl.where(v_ok[None, :], a0 * tl.log(tl.maximum(W, TINY)) - gk, float("-inf"))
        ez = tl.exp(z - tl.max(z, axis=1)[:, None])
        Wc = SCALE * ez / tl.sum(ez, axis=1)[:, None]
    return tl.where(k_ok[:, None] & v_ok[None, :], Wc, 0.0)


@triton.jit
def lag_carry_bwd(W, Wc, gk, a0, gam, dWc, LAG: tl.constexpr, SCALE: tl.constexpr):
    """The vector-Jacobian product of ``lag_carry`` for the carried state's gradient dWc: returns (dW through z, dz,
    da0, dgam) with dz the gradient of z (gk's is -dz):

        elastic  dz = [|z| > gam] dWc,  dgam = -sum sign(z) dz,  dW = a0 dz,  da0 = sum dz W
        KL       dz = Wc (dWc - rowsum(Wc dWc) / SCALE),  dW = a0 dz / W [W >= TINY],  da0 = sum dz log max(W, TINY)"""
    if LAG == 1:
        z = a0 * W - gk
        dz = tl.where((z > gam) | (z < -gam), dWc, 0.0)
        dW = a0 * dz
        da0 = tl.sum(tl.sum(dz * W, axis=1), axis=0)
        dgam = -tl.sum(tl.sum(tl.where(z < 0, -dz, dz), axis=1), axis=0)
    else:
        dz = Wc * (dWc - tl.sum(Wc * dWc, axis=1)[:, None] / SCALE)
        Wl = tl.maximum(W, TINY)
        dW = tl.where(W >= TINY, a0 * dz / Wl, 0.0)
        da0 = tl.sum(tl.sum(dz * tl.log(Wl), axis=1), axis=0)
        dgam = 0.0 * da0
    return dW, dz, da0, dgam


@triton.jit
def lq_scale(W, Q: tl.constexpr, QEPS: tl.constexpr):
    """Lq retention's read scale of a whole [K, V] state block A (Moneta, Miras Eq. 24-25): W = s A with
    s = 1 / nu(A) = (sum |A|^q + eps)^(-(q-2)/q). Returns (s, sum |A|^q + eps)."""
    n = tl.sum(tl.sum(_abs_pow(W, Q), axis=1), axis=0) + QEPS
    return tl.exp(-(Q - 2.0) / Q * tl.log(n)), n


@triton.jit
def lq_scale_grad(W, s, n, Q: tl.constexpr):
    """ds / dA of ``lq_scale`` elementwise: -(q-2) s / n sign(A) |A|^(q-1)."""
    pw = _abs_pow(W, Q - 1.0)
    return tl.where(W < 0, -pw, pw) * (-(Q - 2.0) * s / n)


@triton.jit
def huber_switch(r2, delta):
    """Huber's branch per row: ||r||_2 <= delta, from the row sums r2 = sum_v r^2 (added up over column blocks when
    a row is split)."""
    return tl.sqrt(r2) <= delta


@triton.jit
def huber_deltas(delta, p_g, t_idx, t_ok, BT: tl.constexpr, H: tl.constexpr, V: tl.constexpr, BIAS: tl.constexpr):
    """A chunk's Huber deltas [BT] from the delta buffer at the program's (batch, head) offset p_g into [B, T, H]:
    for BIAS 3, and for BIAS 7 (HUBER_LN, behind a LayerNorm head: after the head's weights [H, V]); 0 otherwise."""
    if BIAS == 3:
        d = tl.load(delta + p_g + t_idx * H, mask=t_ok, other=1.0).to(tl.float32)
    elif BIAS == 7:
        d = tl.load(delta + H * V + p_g + t_idx * H, mask=t_ok, other=1.0).to(tl.float32)
    else:
        d = tl.zeros([BT], dtype=tl.float32)
    return d


@triton.jit
def store_huber_ddelta(ddelta, dd, p_part, p_g, t_idx, t_ok, BTH, H: tl.constexpr, V: tl.constexpr,
                       BIAS: tl.constexpr):
    """Store a chunk's Huber delta gradients dd [BT] where ``huber_deltas`` loaded the deltas: BIAS 3 in the
    partial-sum slot p_part (a multiple of BTH = B*T*H) of [NP, B, T, H]; BIAS 7 (HUBER_LN) after the head weight's
    rows [B, T, H, V]; nothing for the other biases."""
    if BIAS == 3:
        tl.store(ddelta + p_part + p_g + t_idx * H, dd, mask=t_ok)
    elif BIAS == 7:
        tl.store(ddelta + BTH * V + p_g + t_idx * H, dd, mask=t_ok)


@triton.jit
def _whole_row_switch(Y, Vv, delta, BIAS: tl.constexpr):
    """Huber's branch per row from a block holding all of V (a placeholder for the other biases)."""
    if BIAS == 3:
        return huber_switch(tl.sum((Y - Vv) * (Y - Vv), axis=1), delta)
    else:
        return delta == delta


@triton.jit
def bias_rows(Y, Vv, delta, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr):
    """R = dl/dy row-wise for the bias code BIAS. Y, Vv: [BT, BV] fp32 (all of V); delta: [BT] (huber only)."""
    return bias_rows_sw(Y, Vv, delta, _whole_row_switch(Y, Vv, delta, BIAS), BIAS, P, SMOOTH, EPS)


@triton.jit
def bias_rows_bwd(Y, Vv, delta, dR, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr):
    """Vector-Jacobian product of ``bias_rows``: returns (dY, dV, ddelta [BT]). The Huber switch is piecewise."""
    return bias_rows_bwd_sw(Y, Vv, delta, _whole_row_switch(Y, Vv, delta, BIAS), dR, BIAS, P, SMOOTH, EPS)


@triton.jit
def bias_rows_sw(Y, Vv, delta, small, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr, EPS: tl.constexpr):
    """``bias_rows`` on any block of columns, with Huber's branch per row given (``huber_switch``; other biases
    ignore it)."""
    if BIAS == 0:
        R = -Vv
    elif BIAS == 1:
        R = Y - Vv
    elif BIAS == 2:
        r = Y - Vv
        s = r * r + EPS
        R = P * _tanh(SMOOTH * r) * tl.exp(0.5 * (P - 1.0) * tl.log(s))
    else:
        r = Y - Vv
        R = tl.where(small[:, None], r, delta[:, None] * _tanh(SMOOTH * r))
    return R


@triton.jit
def bias_rows_bwd_sw(Y, Vv, delta, small, dR, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr,
                     EPS: tl.constexpr):
    """``bias_rows_bwd`` on any block of columns, with Huber's branch per row given; ddelta is then the block's
    part of a sum over columns."""
    if BIAS == 0:
        dY = tl.zeros_like(dR)
        dV = -dR
        dd = tl.zeros([dR.shape[0]], dtype=tl.float32)
    elif BIAS == 1:
        dY = dR
        dV = -dR
        dd = tl.zeros([dR.shape[0]], dtype=tl.float32)
    elif BIAS == 2:
        r = Y - Vv
        s = r * r + EPS
        th = _tanh(SMOOTH * r)
        pw = tl.exp(0.5 * (P - 1.0) * tl.log(s))
        dY = dR * P * (SMOOTH * (1.0 - th * th) * pw + th * (P - 1.0) * r * pw / s)
        dV = -dY
        dd = tl.zeros([dR.shape[0]], dtype=tl.float32)
    else:
        th = _tanh(SMOOTH * (Y - Vv))
        dY = tl.where(small[:, None], dR, delta[:, None] * SMOOTH * (1.0 - th * th) * dR)
        dV = -dY
        dd = tl.where(small, 0.0, tl.sum(th * dR, axis=1))
    return dY, dV, dd


@triton.jit
def _ln_stats(Y, v_ok, NV: tl.constexpr):
    """LayerNorm of the rows of Y [BT, BV] over their NV real columns (v_ok): (x_hat, rstd), x_hat 0 off them."""
    mean = tl.sum(tl.where(v_ok[None, :], Y, 0.0), axis=1) / NV
    d = tl.where(v_ok[None, :], Y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / NV + LN_EPS)
    return d * rstd[:, None], rstd


@triton.jit
def _ln_project(u, xh, v_ok, NV: tl.constexpr):
    """P(u) = u - mean(u) - x_hat mean(u x_hat) row-wise (the LayerNorm Jacobian without rstd and weight; symmetric),
    0 off the real columns."""
    mu = tl.sum(u, axis=1) / NV
    mx = tl.sum(u * xh, axis=1) / NV
    return tl.where(v_ok[None, :], u - mu[:, None] - xh * mx[:, None], 0.0)


@triton.jit
def ln_rows(Y, Vv, w, delta, v_ok, NV: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr, SMOOTH: tl.constexpr,
            EPS: tl.constexpr):
    """R = dl/dz for a bias (code BIAS: dot, l2, lp, huber with its deltas [BT]) behind a LayerNorm head, z the rows
    of the prediction Y [BT, BV]:

        y = w x_hat(z) (+ what does not depend on z, folded into the targets Vv),  R_y = bias_rows(y, Vv),
        R = J^T R_y = rstd P(w R_y)                                       (J: the Jacobian of y in z)

    w: the head's weight [BV] (0 past V). Whole rows only (the statistics are over all V columns)."""
    xh, rstd = _ln_stats(Y, v_ok, NV)
    Ry = bias_rows(w[None, :] * xh, Vv, delta, BIAS, P, SMOOTH, EPS)  # (Huber's switch: on the residual of y)
    return rstd[:, None] * _ln_project(w[None, :] * Ry, xh, v_ok, NV)


@triton.jit
def ln_rows_bwd(Y, Vv, w, delta, dR, v_ok, NV: tl.constexpr, BIAS: tl.constexpr, P: tl.constexpr,
                SMOOTH: tl.constexpr, EPS: tl.constexpr):
    """Vector-Jacobian product of ``ln_rows`` at dR = e: returns (dY, dVv, dw rows [BT, BV], ddelta [BT]). With
    a = rstd P(e), g = w R_y and F = <e, R> per row:

        (dy, dVv, ddelta) = bias_rows_bwd(y, Vv, w a),   dw = dy x_hat + a R_y,
        dz = rstd P(w dy) - rstd^2 / NV P(g <e, x_hat> + e <g, x_hat>) - rstd F / NV x_hat

    (the first term through y's dependence on z, the others through that of rstd and x_hat in J^T; checked against
    float64 autograd, tests/test_kernels_ttt.py)."""
    xh, rstd = _ln_stats(Y, v_ok, NV)
    y = w[None, :] * xh
    small = _whole_row_switch(y, Vv, delta, BIAS)
    Ry = bias_rows_sw(y, Vv, delta, small, BIAS, P, SMOOTH, EPS)
    g = w[None, :] * Ry
    R = rstd[:, None] * _ln_project(g, xh, v_ok, NV)
    a = rstd[:, None] * _ln_project(dR, xh, v_ok, NV)
    dy, dVv, dd = bias_rows_bwd_sw(y, Vv, delta, small, w[None, :] * a, BIAS, P, SMOOTH, EPS)
    dw = dy * xh + a * Ry
    F = tl.sum(dR * R, axis=1)
    ex = tl.sum(dR * xh, axis=1)
    gx = tl.sum(g * xh, axis=1)
    dz = rstd[:, None] * _ln_project(w[None, :] * dy, xh, v_ok, NV) \
        - (rstd * rstd / NV)[:, None] * _ln_project(g * ex[:, None] + dR * gx[:, None], xh, v_ok, NV) \
        - (rstd * F / NV)[:, None] * xh
    return tl.where(v_ok[None, :], dz, 0.0), tl.where(v_ok[None, :], dVv, 0.0), tl.where(v_ok[None, :], dw, 0.0), dd
