"""The chunked (parallel) form of ``memory_scan``: the papers' mini-batch form with the dual-form read.

Per chunk of n tokens with chunk-start state (A_0, S_0) and read weights W_0 (= A_0 / nu(A_0) for lq):

1. forward of all chunk keys at the gradient point (rows scaled by gamma_t for ``grad_at: decayed``), bias rows R,
   hand backprop -> per-layer rank-one factors (a_{l-1,j}, d_{l,j})                (deep-memory-dual-form.md steps 1-4)
2. gate coefficients beta, f, G (and m, N) from log-cumsums                      (papers.md §1.4.1, Titans Eq. 16-18)
3. reads with per-token weights as masked matmuls (``MLPMemory.dual_read``); lq divides by nu of the chunk start
   (nu of the end state at the last token of a full chunk); kl / elastic take the lag step at token 0 and run the
   rest linearly from it (Miras Eq. 30)
4. end-of-chunk state from the last row of the coefficients.

Nothing of size n x |W| is formed; the Python loop runs over chunks only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from miras.components.memory import masked_scores
from miras.ops_common import final_state, prepare
from miras.spec import MemorySpec


def _end_state(base: Tensor, beta_e: Tensor, aG_t: Tensor, d: Tensor) -> Tensor:
    """``beta_e W_0 - sum_j G[e, j] outer(a_j, d_j)``; beta_e ``[B, H, R]``, aG_t = ``(a * G[e])^T`` ``[B, H, in, n]``."""
    return base * beta_e[..., :, None] - aG_t @ d


def _chunks(x: Tensor, n_chunks: int, b: int, fill: float) -> Tensor:
    """``[B, H, T, ...]`` -> ``[B, H, n_chunks, b, ...]``, padding the last chunk with ``fill``."""
    B, H, T = x.shape[:3]
    pad = n_chunks * b - T
    if pad:
        x = torch.cat([x, x.new_full((B, H, pad, *x.shape[3:]), fill)], dim=2)
    return x.reshape(B, H, n_chunks, b, *x.shape[3:])


def chunked_memory_scan(
    spec: MemorySpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: dict[str, Tensor],
    state: dict[str, Tensor] | None = None,
    *,
    params: dict[str, Tensor] | None = None,
    reads: bool = True,
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Chunk-parallel ``memory_scan`` (see :func:`miras.ops.memory_scan` for the contract).

    ``reads=False`` skips the per-token reads and returns ``(None, final state)`` (TNT's global memory writes only).
    """
    from miras.ops_ext import ext_chunked_memory_scan, uses_ext

    if uses_ext(spec):  # omega bias, muon / dgd learners (ATLAS, NL): miras.ops_ext
        return ext_chunked_memory_scan(spec, q, k, v, gates, state, params=params, reads=reads)
    p = prepare(spec, q, k, v, gates, state, params)
    mem, bias, ret, learner = p.comp.memory, p.comp.bias, p.comp.retention, p.comp.learner
    B, H, T, _ = p.q.shape
    b = min(p.chunk, T)
    NC = -(-T // b)

    # everything that does not depend on the state, for all chunks at once: [B, H, NC, b, ...]
    qc, kc, vc = (_chunks(x, NC, b, 0.0) for x in (p.q, p.k, p.v))
    lr = _chunks(p.lr, NC, b, 0.0)
    if p.keep is not None:
        log_keep = _chunks(torch.log(p.keep.clamp_min(torch.finfo(p.keep.dtype).tiny)), NC, b, 0.0)
    else:
        log_keep = qc.new_zeros(B, H, NC, b, 1)
    mu = _chunks(p.mu, NC, b, 1.0) if p.mu is not None else None
    delta = _chunks(p.delta, NC, b, 1.0) if p.delta is not None else None
    gamma = torch.exp(torch.cumsum(log_keep, dim=-2)) if ret.grad_at == "decayed" else None  # [B, H, NC, b, R]
    if ret.lag:  # the lag token steps non-linearly; the linear part of the chunk starts after it (Miras Eq. 30)
        keep0, lr0 = _chunks(p.keep, NC, b, 1.0)[..., 0, :], lr[..., 0]  # [B, H, NC, R], [B, H, NC]
        log_keep = torch.cat([torch.zeros_like(log_keep[..., :1, :]), log_keep[..., 1:, :]], dim=-2)
        lr = torch.cat([torch.zeros_like(lr[..., :1]), lr[..., 1:]], dim=-1)
    co = learner.coefficients(log_keep, lr, mu)
    # the last row of the coefficients in each chunk (the end-of-chunk state) and the first layer's read factors
    last = torch.full((NC,), b - 1, dtype=torch.long, device=qc.device)
    last[-1] = (T - 1) % b
    chunk_ids = torch.arange(NC, device=qc.device)

    def rows(x: Tensor) -> Tensor:  # [B, H, NC, b, ...] -> [B, H, NC, ...] at token last[c]
        return x[:, :, chunk_ids, last]

    G_e = rows(co.G)  # [B, H, NC, b(j), R]
    pre = dict(
        q=qc, k=kc, v=vc, delta=delta, gamma=gamma, beta=co.beta, G=co.G, f=co.f, G_e=G_e, beta_e=rows(co.beta),
        kG_t=(kc * G_e).transpose(-1, -2),  # [B, H, NC, K, b]
        qb=qc * co.beta if reads else None,  # [B, H, NC, b, V]
        scores0=masked_scores(qc, kc, co.G) if reads else None,  # [B, H, NC, b, b]
    )  # fmt: skip
    if co.f is not None:
        N_e = rows(co.N.transpose(-1, -2))  # [B, H, NC, b(j)]
        pre.update(qf=qc * co.f, f_e=rows(co.f), m_e=rows(co.m), N_e=N_e, kN_t=(kc * N_e[..., None]).transpose(-1, -2))
    # one unbind per tensor (indexing chunk c of the full tensor would cost a full-size zero tensor in the backward)
    per_chunk = {name: None if x is None else x.unbind(2) for name, x in pre.items()}
    if ret.lag:
        keep0, lr0 = keep0.unbind(2), lr0.unbind(2)

    A, S = list(p.W), None if p.S is None else list(p.S)
    outs = []
    for c in range(NC):
        n = min(b, T - c * b)

        def at(name: str, trim: str = "rows", c: int = c, n: int = n) -> Tensor | None:
            """Chunk c of a precomputed tensor, trimmed to the n real tokens on its ``rows``, ``cols``, ``both`` or
            ``none`` (per-chunk scalars)."""
            x = per_chunk.get(name)
            if x is None:
                return None
            x = x[c]
            if n == b or trim == "none":
                return x
            if trim == "rows":
                return x[:, :, :n]
            return x[..., :n] if trim == "cols" else x[:, :, :n, :n]

        kx, vx, qx = at("k"), at("v"), at("q")
        beta, G, f = at("beta"), at("G", "both"), at("f")
        G_e = at("G_e")  # [B, H, n, R]

        # 1. gradient point and per-token gradient factors
        nu0 = [ret.normalizer(a) for a in A]
        W0 = A if nu0[0] is None else [a / nu for a, nu in zip(A, nu0)]
        y, cache = mem.forward_cache(kx, W0, p.params, at("gamma"))
        R = bias.grad(y, vx, at("delta"))  # [B, H, n, V]
        acts, ds = mem.backward_rows(R, cache, W0)

        # 2. base of the linear part: the lag step of kl / elastic, else the carried state
        if ret.lag:
            k0, l0 = keep0[c][..., None], lr0[c][..., None, None]  # [B, H, 1, 1]
            base = [
                ret.lag_step(w, a[:, :, :1].transpose(-1, -2) @ d[:, :, :1], k0, l0, p.params) for w, a, d in zip(A, acts, ds)
            ]
        else:
            base = A

        # 4. end-of-chunk state (needed first: lq reads its last token with the end-state norm)
        aG_t = [at("kG_t", "cols")] + [(a * G_e).transpose(-1, -2) for a in acts[1:]]
        A_end = [_end_state(w, at("beta_e", "none"), x, d) for w, x, d in zip(base, aG_t, ds)]
        if S is not None:
            f_e, m_e, N_e = (
                at("f_e", "none"),
                at("m_e", "none")[..., None, None],
                at("N_e")[..., None],
            )  # [B,H,R], [B,H,1,1], [B,H,n,1]
            aN_t = [at("kN_t", "cols")] + [(a * N_e).transpose(-1, -2) for a in acts[1:]]
            A_end = [x + s * f_e[..., :, None] for x, s in zip(A_end, S)]
            S_end = [s * m_e - x @ d for s, x, d in zip(S, aN_t, ds)]
        else:
            S_end = None

        # 3. reads with per-token weights
        inv_nu = None
        if nu0[0] is not None:  # lq: nu of the chunk start; at the last token of a full chunk, nu of the end state
            inv_nu = [(1.0 / nu_s).expand(B, H, n, 1) for nu_s in nu0]  # [B, H, n, 1]
            if n == p.chunk:
                inv_nu = [torch.cat([x[:, :, 1:], 1.0 / ret.normalizer(a_end)], dim=2) for x, a_end in zip(inv_nu, A_end)]
        if reads:
            first = (at("qb"), at("qf"), at("scores0", "both"))
            read = mem.dual_read(qx, base, beta, G, acts, ds, p.params, S0=S, f=f, inv_nu=inv_nu, first=first)
            outs.append(read)
        A, S = A_end, S_end
    o = torch.cat(outs, dim=2).transpose(1, 2) if reads else None  # [B, T, H, V]
    return o, final_state(A, S)
