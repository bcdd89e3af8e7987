"""The chunked (parallel) form of ``memory_scan``: the papers' mini-batch form with the dual-form read.

Per chunk of n tokens with chunk-start state (A_0, S_0) and read weights W_0 (= A_0 / nu(A_0) for lq):

1. forward of all chunk keys at the gradient point (rows scaled by gamma_t for ``grad_at: decayed``), bias rows R,
   hand backprop -> per-layer rank-one factors (a_{l-1,j}, d_{l,j})                (deep-memory-dual-form.md steps 1-4)
2. gate coefficients beta, f, G (and m, N) from log-cumsums                      (papers.md §1.4.1, Titans Eq. 16-18)
3. reads with per-token weights as masked matmuls (``MLPMemory.dual_read``); lq divides by nu of the chunk start
   (nu of the end state at the last token of a full chunk); kl / elastic take the lag step at token 0 and run the
   rest linearly from it (Miras Eq. 30)
4. end-of-chunk state from the last row of the coefficients.

Nothing of size n x |W| is formed; the Python loop runs over chunks only. Four loops share the precomputed
(chunk-major ``[NC, B, H, b, ...]``) coefficients: ``_linear_scan`` (linear memory with an l2 / dot bias: the chunk
step is affine in the state, four small ops per chunk), ``mlp2_scan`` (miras/ops_chunked_mlp.py: a depth-2 GELU MLP
with an l2 bias, Titans' default memory, as one autograd node with a hand-written backward), ``_stacked_scan`` (any
other memory and bias with retention none / decay, on the stacked state [A; S] per layer) and the general loop below
(lq, kl, elastic).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from miras.components.bias import L2Bias
from miras.components.memory import masked_scores
from miras.ops_chunked_mlp import mlp2_applies, mlp2_scan
from miras.ops_common import chunk_major, final_state, prepare, stacked_decay, stacked_rows
from miras.ops_delta import delta_rule_scan, exact_delta_applies
from miras.spec import MemorySpec


def _end_state(base: Tensor, beta_e: Tensor, aG_t: Tensor, d: Tensor) -> Tensor:
    """``beta_e W_0 - sum_j G[e, j] outer(a_j, d_j)``; beta_e ``[B, H, R]``, aG_t = ``(a * G[e])^T`` ``[B, H, in, n]``."""
    return base * beta_e[..., :, None] - aG_t @ d


def _linear_fast(spec: MemorySpec, mem) -> bool:
    """Whether the chunk recursion is affine in the state: a depth-1 memory without norm / residual, a bias whose
    rows are affine in y (l2, dot) and a linear-family retention (none, decay) with gd or momentum."""
    return (
        mem.depth == 1
        and not mem.norm
        and not mem.residual
        and spec.bias.kind in ("l2", "dot")
        and spec.retention.kind in ("none", "decay")
        and spec.learner.kind in ("gd", "momentum")
    )


def _state_decay(co, ins: list[int], per_chunk) -> Callable[[Tensor, int, int], Tensor]:
    """``D X`` for the stacked state ``X = [A; S]`` (``[A]`` for gd) of layer i in chunk c, ``D = [[beta_e, f_e],
    [0, m_e]]``: a 2 x 2 matrix acting on (A, S) (one bmm) when the keep is per head (R = 1), else row scales of X and
    of X with A and S swapped (channel keep of a linear memory). ins: the input width of each layer's A."""
    NC, B, H = co.beta_e.shape[:3]
    R = co.beta_e.shape[-1]
    if co.f is None:  # gd: X = A
        scale = [per_chunk(co.beta_e[..., None].expand(NC, B, H, n, 1)) for n in ins]
        return lambda X, i, c: X * scale[i][c]
    if R == 1:
        D2 = per_chunk(stacked_decay(co))
        return lambda X, i, c: torch.bmm(D2[c], X.view(X.shape[0], 2, -1)).view(X.shape)
    f_e, m_e = co.f_e[..., None], co.m_e[..., None, None]
    dself = [per_chunk(torch.cat([co.beta_e[..., None].expand(NC, B, H, n, 1), m_e.expand(NC, B, H, n, 1)], -2)) for n in ins]
    dcross = [per_chunk(torch.cat([f_e.expand(NC, B, H, n, 1), m_e.new_zeros(NC, B, H, n, 1)], -2)) for n in ins]
    return lambda X, i, c: torch.addcmul(X * dself[i][c], X.roll(ins[i], 1), dcross[i][c])


def _linear_scan(
    kc: Tensor, vc: Tensor, qc: Tensor | None, co, gamma: Tensor | None, l2: bool, X: Tensor, T: int
) -> tuple[Tensor | None, Tensor]:
    """The chunk recursion of a linear memory with an l2 / dot bias (Miras Eq. 9, Titans Eq. 13-14 in chunks).

    With the gradient-point keys ``k~ = k ⊙ gamma`` (or k) the bias rows of a chunk are ``R = k~ A_0 - v`` (l2) or
    ``-v`` (dot), and on the stacked state ``X = [A; S]`` (``[A]`` for gd)

        X_e = D X_0 - [k ⊙ G_e; k ⊙ N_e]^T R ,  D = [[diag(beta_e), diag(f_e)], [0, m_e I]]     (_end_state)
        o   = P X_0 + U ,  P = [q ⊙ beta - (G ⊙ q k^T) k~, q ⊙ f] ,  U = (G ⊙ q k^T) v              (dual_read)

    (for dot P drops the k~ term). Everything but X is formed for all chunks at once: the loop runs four small ops per
    chunk (read, bias rows, decay, write) and no tensor of size NC x K x K is formed.
    Args: kc, vc, qc ``[NC, B, H, b, K|V]`` (qc None: no reads); co: the chunks' coefficients with their end-of-chunk
    rows; gamma ``[NC, B, H, b, R]`` or None; X ``[B, H, 2K|K, V]``. Returns (o ``[B, H, T, V]`` | None, X_e).
    """
    NC, B, H, b, K = kc.shape
    D, V = X.shape[-2:]

    def per_chunk(x: Tensor) -> tuple[Tensor, ...]:  # [NC, B, H, ...] -> NC tensors [B * H, ...]
        return x.reshape(NC, B * H, *x.shape[3:]).unbind(0)

    kg = kc if gamma is None else kc * gamma  # the gradient-point keys [NC, B, H, b, K]
    kw = kc * co.G_e  # write factors k ⊙ G[e] [NC, B, H, b(j), K]
    if co.f is not None:  # momentum
        kw = torch.cat([kw, kc * co.N_e[..., None]], dim=-1)  # [NC, B, H, b, 2K]
    decay = _state_decay(co, [K], per_chunk)
    # negated so that the loop's products need no scalar factors (each costs a full-size mul in the backward)
    nkw_t, kg_c, nv_c = per_chunk(-kw.transpose(-1, -2)), per_chunk(kg), per_chunk(-vc)
    if qc is not None:
        scores = masked_scores(qc, kc, co.G)  # [NC, B, H, b, b]
        P = qc * co.beta
        if l2:
            P = P - scores @ kg
        if co.f is not None:
            P = torch.cat([P, qc * co.f], dim=-1)  # [NC, B, H, b, 2K]
        P, U = per_chunk(P), per_chunk(scores @ vc)
    X = X.reshape(B * H, D, V)
    outs = []
    for c in range(NC):
        if qc is not None:
            outs.append(torch.baddbmm(U[c], P[c], X))
        R = torch.baddbmm(nv_c[c], kg_c[c], X[:, :K]) if l2 else nv_c[c]  # [B * H, b, V]
        X = torch.baddbmm(decay(X, 0, c), nkw_t[c], R)
    X = X.reshape(B, H, D, V)
    if qc is None:
        return None, X
    o = torch.stack(outs, dim=1).reshape(B, H, NC * b, V)  # [B, H, NC * b, V]
    return o[:, :, :T], X


def _stacked_scan(
    mem,
    bias,
    kc: Tensor,
    vc: Tensor,
    qc: Tensor | None,
    delta: Tensor | None,
    co,
    gamma: Tensor | None,
    X: list[Tensor],
    params: dict[str, Tensor] | None,
    T: int,
) -> tuple[Tensor | None, list[Tensor]]:
    """The chunk loop of the linear-family retentions (none, decay) for any memory and bias, on the stacked per-layer
    state ``X_l = [A_l; S_l]`` (``[A_l]`` for gd) in a ``[B * H, ...]`` layout so that every product is one (b)addbmm:

        X_l,e = D X_l - [a G_e; a N_e]^T d_l ,  D = [[beta_e, f_e], [0, m_e]]            (end of chunk, see _end_state)
        H_l   = [h beta, h f] X_l - (G ⊙ h a^T) d_l                                       (dual-form read, dual_read)

    with the rank-one factors (a_{l-1}, d_l) of the chunk's gradients at the chunk start (``forward_cache`` /
    ``backward_rows`` steps, written inline; ``ds`` holds -d_l, from the bias' negated rows, so both updates are plain
    additions). The last chunk is padded: its padded tokens have eta = 0, so they write nothing and no real token reads
    them. Args as :func:`_linear_scan`, plus the memory and bias components, the Huber deltas ``[NC, B, H, b, 1]`` and
    the memory params; X per layer ``[B, H, 2 in|in, out]``.
    """
    NC, B, H, b, K = kc.shape
    BH, momentum, depth = B * H, co.f is not None, len(X)
    ins = [x.shape[-2] // (2 if momentum else 1) for x in X]

    def per_chunk(x: Tensor | None) -> tuple[Tensor, ...] | list[None]:  # [NC, B, H, ...] -> NC tensors [B * H, ...]
        return [None] * NC if x is None else x.reshape(NC, BH, *x.shape[3:]).unbind(0)

    G = co.G.squeeze(-1) if co.G.shape[-1] == 1 else co.G  # [NC, B, H, b, b(, R)]
    N_e = co.N_e[..., None] if momentum else None  # [NC, B, H, b, 1]
    decay = _state_decay(co, ins, per_chunk)
    v_c, d_c, g_c = per_chunk(vc), per_chunk(delta), per_chunk(gamma)
    # the first layer's state-independent factors for all chunks at once: gradient-point keys, write rows, read rows
    kg_c = per_chunk(kc if gamma is None else kc * gamma)
    aw0_c = per_chunk(stacked_rows(kc, co.G_e, N_e).transpose(-1, -2))  # [B * H, in, b]
    Ge_c, Ne_c = per_chunk(co.G_e), per_chunk(N_e)  # write weights of the rows a_j [B * H, b, 1|R]
    if qc is not None:
        hx0_c, sc0_c, G_c = per_chunk(stacked_rows(qc, co.beta, co.f)), per_chunk(masked_scores(qc, kc, co.G)), per_chunk(G)
        beta_c, f_c = per_chunk(co.beta), per_chunk(co.f)  # read weights of the rows h_t [B * H, b, 1|R]
    # the head's weight-independent part (residual input x, LN bias) for all chunks at once; l2 rows v - y in one op
    w = params["norm_weight"][None].expand(B, -1, -1).reshape(BH, 1, -1) if mem.norm else None  # [B * H, 1, V]
    neg_w = None if w is None else -w

    l2, k_off = isinstance(bias, L2Bias), mem.head_offset(kc, params)  # [NC, B, H, b, V]
    if l2:  # v - y = (v - x - b) - LN(z) w
        nv_c = per_chunk(vc if k_off is None else vc - k_off)
    k_off = per_chunk(k_off)
    if qc is not None:
        q_off = per_chunk(mem.head_offset(qc, params))
    X = [x.reshape(BH, *x.shape[-2:]) for x in X]
    outs = []
    for c in range(NC):
        A = [x[:, :n] for x, n in zip(X, ins)] if momentum else X
        # 1. forward at the gradient point, bias rows, hand backward -> rank-one factors (acts[l], ds[l])
        acts, slopes, h = [None], [], None
        for i in range(depth):
            z = torch.bmm(kg_c[c] if i == 0 else h if g_c[c] is None else h * g_c[c], A[i])
            if i < depth - 1:
                h, slope = mem.act_with_grad(z)  # act'(z) for the hand backward below
                acts.append(h)
                slopes.append(slope)
        if l2:  # negated rows -R = v - y: the updates below add them
            if w is None:
                nR = nv_c[c] - z
            else:
                nR, cache = mem.head_folded(z, nv_c[c], w, neg_w)
        else:
            y, cache = mem.head_folded(z, k_off[c], w)
            nR = bias.neg_grad(y, v_c[c], d_c[c])
        d = mem.head_backward(nR, None if w is None else cache)
        ds = [d]
        for i in range(depth - 1, 0, -1):
            da = torch.bmm(d, A[i].transpose(-1, -2))
            d = da * slopes[i - 1] if g_c[c] is None else da * g_c[c] * slopes[i - 1]
            ds.insert(0, d)
        # 2. reads with per-token weights (dual form) from the chunk-start state
        if qc is not None:
            h = None
            for i in range(depth):
                if i == 0:
                    hx, sc = hx0_c[c], sc0_c[c]
                else:
                    hx = stacked_rows(h, beta_c[c], f_c[c])
                    sc = torch.bmm(h, acts[i].transpose(-1, -2)) * G_c[c]
                Hl = torch.baddbmm(torch.bmm(hx, X[i]), sc, ds[i])
                h = mem.act(Hl) if i < depth - 1 else Hl
            outs.append(mem.head_folded(h, q_off[c], w)[0])
        # 3. end-of-chunk state
        for i in range(depth):
            aw = aw0_c[c] if i == 0 else stacked_rows(acts[i], Ge_c[c], Ne_c[c]).transpose(-1, -2)
            X[i] = torch.baddbmm(decay(X[i], i, c), aw, ds[i])
    X = [x.reshape(B, H, *x.shape[-2:]) for x in X]
    if qc is None:
        return None, X
    return torch.stack(outs, dim=1).reshape(B, H, NC * b, -1)[:, :, :T], X


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
    if exact_delta_applies(spec, p):  # chunk 1 delta rule (DeltaNet, Gated DeltaNet): solved exactly in blocks
        o, A = delta_rule_scan(spec, p, reads=reads)
        return (None if o is None else o.transpose(1, 2)), final_state([A], None)
    mem, bias, ret, learner = p.comp.memory, p.comp.bias, p.comp.retention, p.comp.learner
    B, H, T, _ = p.q.shape
    b = min(p.chunk, T)
    NC = -(-T // b)

    # everything that does not depend on the state, for all chunks at once: [NC, B, H, b, ...]
    qc, kc, vc = (chunk_major(x, NC, b, 0.0) for x in (p.q, p.k, p.v))
    lr = chunk_major(p.lr, NC, b, 0.0)
    if p.keep is not None:
        log_keep = chunk_major(torch.log(p.keep.clamp_min(torch.finfo(p.keep.dtype).tiny)), NC, b, 0.0)
    else:
        log_keep = qc.new_zeros(NC, B, H, b, 1)
    mu = chunk_major(p.mu, NC, b, 1.0) if p.mu is not None else None
    delta = chunk_major(p.delta, NC, b, 1.0) if p.delta is not None else None
    gamma = torch.exp(torch.cumsum(log_keep, dim=-2)) if ret.grad_at == "decayed" else None  # [NC, B, H, b, R]
    if ret.lag:  # the lag token steps non-linearly; the linear part of the chunk starts after it (Miras Eq. 30)
        keep0, lr0 = chunk_major(p.keep, NC, b, 1.0)[..., 0, :], lr[..., 0]  # [NC, B, H, R], [NC, B, H]
        log_keep = torch.cat([torch.zeros_like(log_keep[..., :1, :]), log_keep[..., 1:, :]], dim=-2)
        lr = torch.cat([torch.zeros_like(lr[..., :1]), lr[..., 1:]], dim=-1)
    # the last token of each chunk: its row of the coefficients gives the end-of-chunk state
    last = torch.full((NC,), b - 1, dtype=torch.long, device=qc.device)
    last[-1] = (T - 1) % b
    co = learner.coefficients(log_keep, lr, mu, last)

    if not ret.lag and not ret.normalizes:  # none, decay: the state enters each chunk linearly
        X = [w if p.S is None else torch.cat([w, s], dim=-2) for w, s in zip(p.W, p.S or p.W)]  # [A; S] per layer
        if _linear_fast(spec, mem):
            o, X = _linear_scan(kc, vc, qc if reads else None, co, gamma, spec.bias.kind == "l2", X[0], T)
            X = [X]
        elif mlp2_applies(spec, mem, co):  # depth-2 GELU MLP with an l2 bias: the loop as one autograd node
            o, X = mlp2_scan(mem, kc, vc, qc if reads else None, co, gamma, X, p.params, T)
        else:
            o, X = _stacked_scan(mem, bias, kc, vc, qc if reads else None, delta, co, gamma, X, p.params, T)
        W = [x[..., : w.shape[-2], :] for x, w in zip(X, p.W)]
        S = None if p.S is None else [x[..., w.shape[-2] :, :] for x, w in zip(X, p.W)]
        return (None if o is None else o.transpose(1, 2)), final_state(W, S)

    G_e = co.G_e  # [NC, B, H, b(j), R]
    pre = dict(
        q=qc, k=kc, v=vc, delta=delta, gamma=gamma, beta=co.beta, G=co.G, f=co.f, G_e=G_e, beta_e=co.beta_e,
        kG_t=(kc * G_e).transpose(-1, -2),  # [NC, B, H, K, b]
        qb=qc * co.beta if reads else None,  # [NC, B, H, b, V]
        scores0=masked_scores(qc, kc, co.G) if reads else None,  # [NC, B, H, b, b]
    )  # fmt: skip
    if co.f is not None:
        N_e = co.N_e  # [NC, B, H, b(j)]
        pre.update(qf=qc * co.f, f_e=co.f_e, m_e=co.m_e, N_e=N_e, kN_t=(kc * N_e[..., None]).transpose(-1, -2))
    # one unbind per tensor (indexing chunk c of the full tensor would cost a full-size zero tensor in the backward)
    per_chunk = {name: None if x is None else x.unbind(0) for name, x in pre.items()}
    if ret.lag:
        keep0, lr0 = keep0.unbind(0), lr0.unbind(0)

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
