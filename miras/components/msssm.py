"""MS-SSM: a multi-scale selective state-space token mixer.

Karami, Behrouz, Zhong, Pascanu, Mirrokni 2025, "MS-SSM: A Multi-Scale State Space Model for Efficient Sequence
Modeling", arXiv:2512.23824. The paper's equations were not available to us: this is the RECONSTRUCTION [R] of
shared/reference/papers.md §8.2 (abstract + the description in the later MS-GLA paper):

    u        = x W_in                                                       [B, T, E]
    a_0 = u;  [a_s ; d_s] = DWConv_{L, dilation 2^(s-1)}(a_{s-1}),  s = 1..S   causal depthwise, 1 -> 2 channels
    u^(g)    = (d_1, ..., d_S, a_S)[g]                                      G = S + 1 scales, fine -> coarse
    h^(g)_t  = exp(dt_t A_g) * h^(g)_{t-1} + dt_t B_t u^(g)_t               diagonal selective SSM per scale (Mamba S6)
    y^(g)_t  = C_t h^(g)_t + D_g u^(g)_t                                    dt, B, C computed from u^(g)_t
    w_t      = softmax(x_t W_mix)                                           input-dependent scale mixer over G scales
    o_t      = W_out((sum_g w_{t,g} y^(g)_t) * SiLU(x_t W_gate))

Scale-dependent initialisation: the step ``dt`` of scale g starts 2^-g times smaller, so ``exp(dt A)`` (the transition
eigenvalue) is closer to 1 at coarser scales (slow forgetting) and smaller at finer ones. The decomposition starts
as a stationary Haar-like wavelet (approximation = moving average, detail = moving difference).

The SSM is linear in its state, so it has a parallel form: :func:`selective_scan_chunked` composes the per-token
affine maps ``h -> exp(dt_t A) h + dt_t u_t B_t`` with a log-depth prefix scan inside each chunk (the cumulative
transition ``exp(sum dt A)`` is built as a running product, which cannot overflow); :func:`selective_scan_recurrent`
is the token-by-token oracle it is tested against. On CPU the plain recurrence (``chunk_size: 1``) is fastest.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from miras.registry import BLOCK
from miras.spec import MSSSMSpec


def msssm_dims(spec: MSSSMSpec, d_model: int) -> tuple[int, int, int, int]:
    """``(E, G, N, R)``: inner width, number of scales S + 1, state size per channel, dt rank."""
    E = max(1, round(spec.expand * d_model))
    R = spec.dt_rank if spec.dt_rank is not None else max(1, math.ceil(d_model / 16))
    return E, spec.scales + 1, spec.d_state, R


def msssm_param_count(spec: MSSSMSpec, *, d_model: int) -> int:
    """Parameters of :class:`MSSSMMixer` (mirrored by miras/params.py)."""
    E, G, N, R = msssm_dims(spec, d_model)
    n = d_model * E * (3 if spec.gate else 2)  # W_in, W_gate, W_out
    n += spec.scales * E * 2 * spec.kernel_size  # decomposition convs
    n += G * (E * (R + 2 * N) + R * E + E + E * N + E)  # x_proj, dt_proj, dt_bias, A_log, D
    return n + d_model * G + G  # scale mixer


def conv_contexts(spec: MSSSMSpec) -> list[int]:
    """Left context of every decomposition level: ``(L - 1) * 2^(s-1)``."""
    return [(spec.kernel_size - 1) * 2**s for s in range(spec.scales)]


def msssm_state_numel(spec: MSSSMSpec, *, d_model: int) -> int:
    """Elements of the decoding state per sequence: the SSM states ``G * E * N`` plus the dilated-conv buffers."""
    E, G, N, _ = msssm_dims(spec, d_model)
    return G * E * N + E * sum(conv_contexts(spec))


def multiscale_decompose(u: Tensor, weight: Tensor, ctx: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
    """Recursive dilated causal depthwise convs: ``u [B, T, E]``, ``weight [S, E, 2, L]`` -> ``[B, T, S + 1, E]``.

    Level s (0-based) has dilation 2^s; ``ctx[s] [B, (L-1) 2^s, E]`` is the left context of its input (zeros at the
    start of a sequence). Returns the scales (details d_1..d_S, then the approximation a_S) and the new contexts.
    """
    S, E, _, L = weight.shape
    B, T = u.shape[:2]
    a, outs, new_ctx = u, [], []
    for s in range(S):
        dil = 2**s
        n_ctx = (L - 1) * dil
        left = ctx[s] if ctx is not None else u.new_zeros(B, n_ctx, E)
        xs = torch.cat([left, a], 1)  # [B, n_ctx + T, E]
        new_ctx.append(xs[:, xs.shape[1] - n_ctx :])
        out = F.conv1d(xs.transpose(1, 2), weight[s].reshape(2 * E, 1, L), dilation=dil, groups=E)  # [B, 2E, T]
        out = out.reshape(B, E, 2, T)
        a = out[:, :, 0].transpose(1, 2)  # approximation [B, T, E]
        outs.append(out[:, :, 1].transpose(1, 2))  # detail
    outs.append(a)
    return torch.stack(outs, 2), new_ctx


def selective_scan_recurrent(u: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """Oracle: ``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t``, ``y_t = C_t . h_t``, token by token.

    ``u, dt [B, T, G, E]``; ``A [G, E, N]`` (negative); ``Bm, Cm [B, T, G, N]``; ``h0 [B, G, E, N]``.
    Returns ``(y [B, T, G, E], h_T)``.
    """
    h, ys = h0, []
    for t in range(u.shape[1]):
        d = dt[:, t, :, :, None]  # [B, G, E, 1]
        h = torch.exp(d * A) * h + d * u[:, t, :, :, None] * Bm[:, t, :, None, :]
        ys.append(torch.einsum("bgen,bgn->bge", h, Cm[:, t]))
    return torch.stack(ys, 1), h


def selective_scan_chunked(
    u: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h0: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """The same recurrence, parallel inside each chunk of ``chunk_size`` tokens (shapes as the recurrent oracle).

    Each token is the affine map ``h -> a_t h + b_t`` with ``a_t = exp(dt_t A)``, ``b_t = dt_t u_t B_t``; a chunk
    composes them with a log-depth (Hillis-Steele) prefix scan, ``(a, b)_t <- (a_t a_{t-o}, a_t b_{t-o} + b_t)`` for
    o = 1, 2, 4, ..., so ``b_t`` becomes ``h_t`` (the chunk-start state folded into the first token). Every factor is
    a product of transitions in (0, 1]: no overflow, unlike ``exp(L_t) cumsum(exp(-L_tau) b_tau)``. ``chunk_size``
    1 is the plain recurrence (fastest on CPU); larger chunks trade O(c log c) work for O(log c) depth (GPU).
    """
    T, ys, h = u.shape[1], [], h0
    if chunk_size == 1:  # all transitions and inputs at once, then only h = a_t h + b_t per token
        a = torch.exp(dt[..., None] * A)  # [B, T, G, E, N]
        b = (dt * u)[..., None] * Bm[:, :, :, None, :]
        hs = []
        for a_t, b_t in zip(a.unbind(1), b.unbind(1), strict=True):  # unbind: one gradient buffer, not T
            h = torch.addcmul(b_t, a_t, h)
            hs.append(h)
        return (torch.einsum("btgen,btgn->btge", torch.stack(hs, 1), Cm) if hs else u.new_zeros(u.shape)), h
    for s in range(0, T, chunk_size):
        sl = slice(s, min(s + chunk_size, T))
        c = sl.stop - sl.start
        a = torch.exp(dt[:, sl, :, :, None] * A)  # [B, c, G, E, N]
        b = (dt[:, sl] * u[:, sl])[..., None] * Bm[:, sl, :, None, :]  # [B, c, G, E, N]
        b = torch.cat([a[:, :1] * h[:, None] + b[:, :1], b[:, 1:]], 1)
        o = 1
        while o < c:
            b = torch.cat([b[:, :o], a[:, o:] * b[:, :-o] + b[:, o:]], 1)
            a = torch.cat([a[:, :o], a[:, o:] * a[:, :-o]], 1)
            o *= 2
        ys.append(torch.einsum("btgen,btgn->btge", b, Cm[:, sl]))
        h = b[:, -1]
    y = torch.cat(ys, 1) if ys else u.new_zeros(u.shape)
    return y, h


class MSSSMMixer(nn.Module):
    """Multi-scale decomposition -> one selective SSM per scale -> input-dependent scale mixer -> gate -> W_out.

    ``forward(x [B, T, D], state) -> (y [B, T, D], state)``; the state ``{"h": [B, G, E, N], "conv": [per level
    context]}`` continues a sequence exactly (token-by-token decoding equals the full forward).
    """

    def __init__(self, spec: MSSSMSpec, *, d_model: int) -> None:
        super().__init__()
        self.spec = spec
        E, G, N, R = msssm_dims(spec, d_model)
        self.E, self.G, self.N, self.R = E, G, N, R
        S, L = spec.scales, spec.kernel_size
        self.w_in = nn.Linear(d_model, E, bias=False)
        self.w_gate = nn.Linear(d_model, E, bias=False) if spec.gate else None
        self.w_out = nn.Linear(E, d_model, bias=False)
        # Haar-like start: approximation = moving average, detail = (first half - second half) / L
        approx = torch.full((L,), 1.0 / L)
        detail = torch.where(torch.arange(L) < L / 2, 1.0, -1.0) / L if L > 1 else torch.ones(1)
        self.decomp = nn.Parameter(torch.stack([approx, detail]).expand(S, E, 2, L).clone())
        bound = 1.0 / math.sqrt(E)
        self.x_proj = nn.Parameter(torch.empty(G, E, R + 2 * N).uniform_(-bound, bound))
        self.dt_proj = nn.Parameter(torch.empty(G, R, E).uniform_(-(R**-0.5), R**-0.5))
        # scale-dependent dt: log-spaced over channels in [dt_min, dt_max], divided by 2^g at scale g
        dt0 = torch.exp(torch.linspace(math.log(spec.dt_min), math.log(spec.dt_max), E))
        dt = dt0[None] / (2.0 ** torch.arange(G, dtype=torch.float32))[:, None]  # [G, E]
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(G, E, N).clone())
        self.D = nn.Parameter(torch.ones(G, E))
        self.w_mix = nn.Linear(d_model, G, bias=True)
        nn.init.zeros_(self.w_mix.bias)

    def initial_state(self, x: Tensor) -> dict:
        """Zero SSM states ``h [B, G, E, N]`` and zero left contexts of the decomposition convs (a fresh sequence)."""
        B = x.shape[0]
        dtype = torch.promote_types(x.dtype, torch.float32)
        return {"h": x.new_zeros(B, self.G, self.E, self.N, dtype=dtype),
                "conv": [x.new_zeros(B, n, self.E) for n in conv_contexts(self.spec)]}

    def ssm_inputs(self, U: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``dt [B, T, G, E]``, ``A [G, E, N]``, ``B, C [B, T, G, N]`` from the scale signals ``U [B, T, G, E]``."""
        proj = torch.einsum("btge,gef->btgf", U, self.x_proj.to(U.dtype))
        dtl, Bm, Cm = proj.split([self.R, self.N, self.N], dim=-1)
        dt = F.softplus(torch.einsum("btgr,gre->btge", dtl, self.dt_proj.to(U.dtype)) + self.dt_bias.to(U.dtype))
        return dt, -torch.exp(self.A_log.to(U.dtype)), Bm, Cm

    def scale_weights(self, x: Tensor) -> Tensor:
        """Mixer weights ``[B, T, G]`` (softmax over scales, or the raw linear map for ``mixer: linear``)."""
        w = self.w_mix(x)
        return torch.softmax(w, dim=-1) if self.spec.mixer == "softmax" else w

    def forward(self, x: Tensor, state: dict | None = None, *, recurrent: bool = False) -> tuple[Tensor, dict]:
        """Mix ``x [B, T, D]``; ``recurrent=True`` runs the token-by-token oracle scan instead of the chunked one."""
        if state is None:
            state = self.initial_state(x)
        U, conv = multiscale_decompose(self.w_in(x), self.decomp.to(x.dtype), state["conv"])  # [B, T, G, E]
        dtype = torch.promote_types(x.dtype, torch.float32)
        U = U.to(dtype)
        dt, A, Bm, Cm = self.ssm_inputs(U)
        if recurrent:
            y, h = selective_scan_recurrent(U, dt, A, Bm, Cm, state["h"].to(dtype))
        else:
            y, h = selective_scan_chunked(U, dt, A, Bm, Cm, state["h"].to(dtype), self.spec.chunk_size)
        y = y + self.D.to(dtype) * U
        z = torch.einsum("btg,btge->bte", self.scale_weights(x).to(dtype), y).to(x.dtype)
        if self.w_gate is not None:
            z = z * F.silu(self.w_gate(x))
        return self.w_out(z), {"h": h, "conv": conv}


@BLOCK.register("msssm")
class MSSSMBlock(nn.Module):
    """The ``msssm`` block: ``y = MSSSMMixer(x)`` alone (the model adds the residual and the channel MLP)."""

    def __init__(self, *, mixer: MSSSMMixer) -> None:
        super().__init__()
        self.mixer = mixer

    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        return self.mixer(x, state)
