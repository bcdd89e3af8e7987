r"""Memory Caching (Behrouz et al. 2026, arXiv:2602.24281): the sixth axis, a growing memory made of segment caches.

The sequence is cut into segments S^(1), ..., S^(N) (``CachingSpec.segment_bounds``: constant length C, or logarithmic
lengths C, C, 2C, 4C, ...). Inside segment s the layer's memory runs as usual (``memory_scan``), starting from the
previous segment's end state (``write: continue``, "checkpoints of one optimizer") or from the learned initial state
(``write: fresh``, "independent compressors", MC §3.4). The end state of every finished segment is cached, with the
mean of its inputs ``pool_i = MeanPooling(S^(i))``. Token t of segment s reads (MC §3.2, papers.md §6.2):

    residual          y_t = M_t^(s)(q_t) + sum_{i<s} M^(i)(q_t)
    gated_residual    y_t = gamma_t^(s) M_t^(s)(q_t) + sum_{i<s} gamma_t^(i) M^(i)(q_t)
                      gamma_t = softmax_i(<u_t, pool_i> / sqrt(D)),  u_t = x_t W_u  (the connector projection)
    soup              y_t = M(q_t; W*_t),  W*_{l,t} = gamma_t^(s) W_{l,t}^(s) + sum_{i<s} gamma_t^(i) W_l^(i)  (every layer l)
    sparse_selective  gated_residual over the online memory and the top_k caches by <u_t, pool_i> (others masked)
    post_training     gated_residual / soup with uniform weights 1/s (moving average of the caches, no learned gates)

Only segments strictly before the current one are cached (causality). The online memory's pool is the causal running
mean of the current segment up to t (the paper's mean over the whole segment would read future tokens) [R]. The
1/sqrt(D) temperature is ours [R]. Cost: segment s reads s - 1 caches, O(T * T / C) reads for constant segments
(O(T log T) for logarithmic ones).

Decoding: the carried state holds the online memory at the last chunk boundary of the current segment (chunks are
aligned with the segment start), the unfinished chunk's inputs, the caches, their pools and the running input sum of
the current segment, so that any split of a sequence into calls reproduces the one-call outputs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from miras.components.memory import masked_scores, state_shapes
from miras.ops_chunked import _end_state
from miras.ops_common import check_inputs, final_state, prepare
from miras.spec import CachingSpec, MemorySpec, ModelSpec

if TYPE_CHECKING:
    from miras.components.mixer import MemoryMixer


def segment_end(spec: CachingSpec, start: int) -> int:
    """End (exclusive) of the full segment starting at ``start`` (see ``CachingSpec.segment_bounds``)."""
    if spec.segmentation == "constant" or start == 0:
        return start + spec.segment_length
    return 2 * start


def n_segments(spec: CachingSpec, seq_len: int) -> int:
    """Number of segments of a ``seq_len``-token sequence (the last may be cut short)."""
    return len(spec.segment_bounds(seq_len))


def caching_state_bytes(spec: ModelSpec, seq_len: int, dtype_bytes: int = 2) -> int:
    """Extra decoding state of Memory Caching after ``seq_len`` tokens, all memory layers: the cached memory weights
    (N - 1 segments) plus the pools and the running segment sum (gated kinds). Grows linearly with the segment count."""
    cache = spec.memory.caching
    if cache.kind == "none" or not spec.uses_memory:
        return 0
    n_cached = max(n_segments(cache, seq_len) - 1, 0)
    H, dh = spec.n_heads, spec.d_head
    # caches keep the weights W only, not the momentum S
    w_bytes = H * dtype_bytes * sum(math.prod(s) for key, s in state_shapes(spec.memory, dh, dh).items() if key[0] == "W")
    per_layer = n_cached * w_bytes
    if cache.gated:
        per_layer += (n_cached + 1) * spec.d_model * dtype_bytes
    n_mem = sum(1 for b in spec.blocks if b in ("lmm", "mag", "mal"))
    return n_mem * per_layer


# ------------------------------------------------------------------------------------------------ memory soup scan


def soup_memory_scan(
    spec: MemorySpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: dict[str, Tensor],
    state: dict[str, Tensor] | None,
    caches: list[dict[str, Tensor]],
    weights: Tensor,
    *,
    params: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``memory_scan`` whose read at token t uses the memory soup ``W*_t = w_t[-1] W_t + sum_i w_t[i] W^(i)`` (MC §3.2).

    The writes are those of the chunked ``memory_scan``; the read mixes, layer by layer, the online memory's per-token
    weights (dual form, ``MLPMemory.dual_read``) with the cached weights: ``H_l = w_on * h W_{l,t} + sum_i w_i h W_l^(i)``,
    ``h = act(H_l)``, then the output head (norm, residual) once. For a linear memory this equals the gated residual read.

    Args: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, gates and state as for ``memory_scan``; caches: N states ``W1..WL``
    ``[B, H, in, out]``; weights ``[B, T, N + 1]`` (the online memory last). Retention none, decay or lq only.
    Returns: o ``[B, T, H, V]``, final state.
    """
    check_inputs(spec, q, k, v, gates, state, params)
    out_dtype = q.dtype
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    gates = {n: g.to(dt) for n, g in gates.items()}
    state = None if state is None else {n: s.to(dt) for n, s in state.items()}
    params = None if params is None else {n: x.to(dt) for n, x in params.items()}
    p = prepare(spec, q, k, v, gates, state, params)
    mem, bias, ret, learner = p.comp.memory, p.comp.bias, p.comp.retention, p.comp.learner
    if ret.lag:
        raise ValueError(f"soup_memory_scan: retention must be none, decay or lq, but got retention={spec.retention.kind!r}.")
    B, H, T, _ = p.q.shape
    depth, b, N = len(p.W), p.chunk, len(caches)
    cached = [  # per layer: [N, B, H, in, out] read weights of the caches
        torch.stack([ret.effective([c[f"W{i + 1}"].to(dt)])[0].expand_as(p.W[i]) for c in caches]) if N else None
        for i in range(depth)
    ]
    w = weights.to(dt)[:, None]  # [B, 1, T, N + 1]
    A, S = list(p.W), None if p.S is None else list(p.S)
    outs = []
    for c0 in range(0, T, b):
        n = min(b, T - c0)
        sl = slice(c0, c0 + n)
        qx, kx, vx, lr = p.q[:, :, sl], p.k[:, :, sl], p.v[:, :, sl], p.lr[:, :, sl]
        if p.keep is not None:
            log_keep = torch.log(p.keep[:, :, sl].clamp_min(torch.finfo(dt).tiny))
        else:
            log_keep = qx.new_zeros(B, H, n, 1)
        co = learner.coefficients(log_keep, lr, None if p.mu is None else p.mu[:, :, sl])
        gamma = torch.exp(torch.cumsum(log_keep, dim=-2)) if ret.grad_at == "decayed" else None
        # gradient point and per-token rank-one gradient factors (as in ops_chunked)
        nu0 = [ret.normalizer(a) for a in A]
        W0 = A if nu0[0] is None else [a / nu for a, nu in zip(A, nu0)]
        y, fc = mem.forward_cache(kx, W0, p.params, gamma)
        R = bias.grad(y, vx, None if p.delta is None else p.delta[:, :, sl])
        acts, ds = mem.backward_rows(R, fc, W0)
        # end-of-chunk state
        G_e, beta_e = co.G[:, :, -1], co.beta[:, :, -1]  # [B, H, n(j), R], [B, H, R]
        A_end = [_end_state(a, beta_e, (x * G_e).transpose(-1, -2), d) for a, x, d in zip(A, acts, ds)]
        S_end = None
        if S is not None:
            f_e, m_e, N_e = co.f[:, :, -1], co.m[:, :, -1][..., None, None], co.N[..., :, -1]  # N_e: [B, H, n(j)]
            A_end = [x + s * f_e[..., :, None] for x, s in zip(A_end, S)]
            S_end = [s * m_e - (x * N_e[..., None]).transpose(-1, -2) @ d for s, x, d in zip(S, acts, ds)]
        inv_nu = None
        if nu0[0] is not None:  # lq: nu of the chunk start; the last token of a full chunk reads with the end state's
            inv_nu = [(1.0 / nu).expand(B, H, n, 1) for nu in nu0]
            if n == b:
                inv_nu = [torch.cat([x[:, :, 1:], 1.0 / ret.normalizer(a)], dim=2) for x, a in zip(inv_nu, A_end)]
        # soup read: mix the online per-token weights and the cached weights layer by layer
        wt = w[:, :, sl]  # [B, 1, n, N + 1]
        h = qx
        for i in range(depth):
            Hl = (h * co.beta) @ A[i] - masked_scores(h, acts[i], co.G) @ ds[i]  # h W_{i,t} (dual form)
            if S is not None:
                Hl = Hl + (h * co.f) @ S[i]
            if inv_nu is not None:
                Hl = Hl * inv_nu[i]
            Hl = Hl * wt[..., -1:]
            if N:
                hc = torch.einsum("bhti,nbhio->nbhto", h, cached[i])
                Hl = Hl + torch.einsum("nbhto,bztn->bhto", hc, wt[..., :-1])
            h = mem.act(Hl) if i < depth - 1 else Hl
        outs.append(mem.head(h, qx, p.params)[0])
        A, S = A_end, S_end
    o = torch.cat(outs, dim=2).transpose(1, 2)  # [B, T, H, V]
    return o.to(out_dtype), final_state(A, S)


# ------------------------------------------------------------------------------------------------ the wrapper


class MemoryCaching(nn.Module):
    """The caching policy of one memory layer; :class:`MemoryMixer` calls ``forward(mixer, x, state)`` in its place.

    Args:
        spec: the caching spec (kind != none).
        d_model: width of the mixer input (the connector projection ``W_u: [D, D]``, gated kinds only).
    """

    def __init__(self, spec: CachingSpec, *, d_model: int) -> None:
        super().__init__()
        self.spec, self.d_model = spec, d_model
        self.w_u = nn.Linear(d_model, d_model, bias=False) if spec.gated else None

    # ---------------------------------------------------------------------------------------------- weights
    def weights(self, x: Tensor, u: Tensor | None, pools: Tensor, seg_sum: Tensor, offset: int) -> Tensor:
        """Aggregation weights ``[B, n, N + 1]`` (caches, then the online memory) for the tokens ``x [B, n, D]`` of one
        segment starting ``offset`` tokens after the segment start; ``pools [B, N, D]``, ``seg_sum [B, D]`` (inputs of
        the segment before x)."""
        B, n, _ = x.shape
        N = pools.shape[1]
        kind = self.spec.kind
        if kind == "residual":
            return x.new_ones(B, n, N + 1)
        if u is None:  # post_training: the moving average of the caches and the online memory
            return x.new_full((B, n, N + 1), 1.0 / (N + 1))
        count = torch.arange(offset + 1, offset + n + 1, device=x.device, dtype=x.dtype)[None, :, None]
        pool_on = (seg_sum[:, None] + torch.cumsum(x, 1)) / count  # causal running mean of the segment [B, n, D]
        scale = 1.0 / math.sqrt(self.d_model)
        s_on = (u * pool_on).sum(-1, keepdim=True) * scale  # [B, n, 1]
        s_c = (u @ pools.transpose(1, 2)) * scale  # [B, n, N]
        if kind == "sparse_selective" and N > self.spec.top_k:
            top = s_c.topk(self.spec.top_k, dim=-1).indices
            keep = torch.zeros_like(s_c, dtype=torch.bool).scatter(-1, top, True)
            s_c = s_c.masked_fill(~keep, float("-inf"))
        return torch.softmax(torch.cat([s_c, s_on], -1), -1)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, mixer: MemoryMixer, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        """Mix ``x [B, T, D]`` with the cached memory; returns ``(y [B, T, D], state)`` (see the module docstring)."""
        b = mixer.spec.learner.chunk_size
        B, _, D = x.shape
        if state is None:
            mem, ctx, n_pending, pos = mixer.initial_state(), x[:, :0], 0, 0
            caches, pools, seg_sum = [], x.new_zeros(B, 0, D), x.new_zeros(B, D)
        else:
            mem, ctx, n_pending, pos = state["memory"], state["ctx"], state["n_pending"], state["pos"]
            caches, pools, seg_sum = list(state["caches"]), state["pools"], state["seg_sum"]
        xs = torch.cat([ctx, x], 1)
        lead = ctx.shape[1] - n_pending
        q, k, v, gates = mixer.features(xs)
        q, k, v, xn = q[:, lead:], k[:, lead:], v[:, lead:], xs[:, lead:]
        gates = {name: g[:, lead:] for name, g in gates.items()}
        u = self.w_u(xn) if self.w_u is not None else None
        n = xn.shape[1]
        end = pos + n
        outs = []
        start = max(s for s, _ in self.spec.segment_bounds(pos + 1))  # the segment holding position pos
        while start < end:
            seg_e = segment_end(self.spec, start)
            p0, p1 = max(start, pos), min(seg_e, end)
            i0, i1 = p0 - pos, p1 - pos
            sl = slice(i0, i1)
            w = self.weights(xn[:, sl], None if u is None else u[:, sl], pools, seg_sum, p0 - start)
            qs, ks, vs = q[:, sl], k[:, sl], v[:, sl]
            gs = {name: g[:, sl] for name, g in gates.items()}
            m = i1 - i0

            def scan(a: int, z: int, st: dict, qs=qs, ks=ks, vs=vs, gs=gs, w=w, caches=caches) -> tuple[Tensor, dict]:
                part = {name: g[:, a:z] for name, g in gs.items()}
                if self._soup_scan(mixer):
                    return soup_memory_scan(mixer.spec, qs[:, a:z], ks[:, a:z], vs[:, a:z], part, st, caches, w[:, a:z],
                                            params=mixer.memory_params())
                return mixer.scan(qs[:, a:z], ks[:, a:z], vs[:, a:z], part, st)

            complete = p1 == seg_e
            n_full = m if complete else m // b * b
            if n_full in (0, m):
                o, final = scan(0, m, mem)
                boundary = final if n_full == m else mem
            else:  # split at the last chunk boundary so the carried state is a boundary state
                o1, boundary = scan(0, n_full, mem)
                o2, final = scan(n_full, m, boundary)
                o = torch.cat([o1, o2], 1)
            if not self._soup_scan(mixer):  # soup mixed the parameters inside the scan already
                o = self._aggregate(mixer, o, qs, caches, w)
            outs.append(o)
            if complete:  # cache the end state and its pool; the next segment continues or starts fresh
                caches.append({key: t for key, t in final.items() if key.startswith("W")})
                pools = torch.cat([pools, ((seg_sum + xn[:, sl].sum(1)) / (seg_e - start))[:, None]], 1)
                seg_sum = x.new_zeros(B, D)
                mem = final if self.spec.write == "continue" else mixer.initial_state()
                pos_b, n_pending = p1, 0
            else:
                seg_sum = seg_sum + xn[:, i0 : i0 + n_full].sum(1)
                mem, pos_b, n_pending = boundary, p0 + n_full, m - n_full
            start = seg_e
        o = torch.cat(outs, 1)
        y = mixer.output(o[:, n - x.shape[1] :], x)
        keep = min(n_pending + mixer.conv_context, xs.shape[1])
        new_state = {"memory": mem, "ctx": xs[:, xs.shape[1] - keep :], "n_pending": n_pending, "pos": pos_b,
                     "caches": caches, "pools": pools, "seg_sum": seg_sum}
        return y, new_state

    def _soup_scan(self, mixer: MemoryMixer) -> bool:
        """Soup mixes parameters in the scan; on a linear memory with kl/elastic retention it is the GRM read (linear)."""
        return self.spec.kind == "soup" and mixer.spec.retention.kind not in ("kl", "elastic")

    def _aggregate(self, mixer: MemoryMixer, o: Tensor, q: Tensor, caches: list[dict], w: Tensor) -> Tensor:
        """``w_on * o + sum_i w_i M^(i)(q)``: reads of all caches at once (batched over the cache axis)."""
        N, B = len(caches), q.shape[0]
        w = w.to(o.dtype)
        if N == 0:
            return o * w[..., -1:, None]
        stacked = {key: torch.cat([c[key].expand(B, *c[key].shape[-3:]) for c in caches], 0) for key in caches[0]}
        reads = mixer.read(q.repeat(N, 1, 1, 1), stacked)  # [N * B, n, H, V]
        reads = reads.reshape(N, B, *reads.shape[1:]).to(o.dtype)
        return o * w[..., -1:, None] + torch.einsum("nbthv,btn->bthv", reads, w[..., :-1])


__all__ = ["MemoryCaching", "caching_state_bytes", "n_segments", "segment_end", "soup_memory_scan"]
