r"""``memory_scan`` for the ATLAS / Nested-Learning options: the Omega bias, the Muon and DGD learning rules.

Same contract and chunk semantics as :mod:`miras.ops_recurrent` / :mod:`miras.ops_chunked` (chunk size b, gradients at the
chunk-start point, read after the write); ``memory_scan`` dispatches here when :func:`uses_ext` is true.

Omega (ATLAS Eq. 9-10): token t's gradient is the window sum ``g~_t = sum_{i=t-c+1..t} gamma_i g_i`` with every g_i taken
at the chunk-start point of token t's chunk (b = 1: exactly ATLAS Eq. 9-10 with the gradient at W_{t-1}). The keys,
values, gates gamma (and Huber deltas) of the c - 1 tokens before a call are carried in the state (``window_*``), so a
continued sequence sees the same windows. Chunked: the per-token gradient factors of the chunk and of the c - 1 tokens
before it are computed once at the chunk-start point; the window is the banded 0/1 matrix Mix[t, i] (t <= i <= t + c - 1
in the extended token index), folded into the coefficients: ``G' = G Mix``, ``N' = Mix^T N``.

    gd              A_t = alpha_t A_{t-1} - eta_t g~_t
    momentum        S_t = mu_t S_{t-1} - eta_t g~_t ;  A_t = alpha_t A_{t-1} + S_t                   (Titans Eq. 13-14)
    muon            S_t = mu_t S_{t-1} - eta_t g~_t ;  A_t = alpha_t A_{t-1} + NS_k(S_t)             (ATLAS Eq. 32-33)
    dgd             A_t = (alpha_t I - eta_t k_t^T k_t) A_{t-1} - eta_t g~_t                        (NL Eq. 57)

Chunked Muon materialises the momentum (and the weights) of every token of a chunk: b x |W| per chunk (NS is not linear;
deep-memory-dual-form.md "What fits and what needs care"). Chunked DGD keeps the dual form: with p_t = eta_t k_t A_{t-1},
``A_t = beta_t A_0 - sum_j E[t, j] k_j^T p_j - sum_i G'[t, i] a_i^T d_i`` and the p_t solve the unit lower-triangular
system ``(I + L) P = eta (beta_{t-1} k A_0 - (G'_{t-1} . k a^T) D)``, ``L[t, j] = eta_t E[t-1, j] k_t.k_j`` (j < t) — the
UT transform of DeltaNet, applied token-exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from miras.components.learner import MomentumLearner, _decay_matrix
from miras.components.memory import masked_scores
from miras.ops_common import Prepared, final_state, prepare, row_scale
from miras.spec import MemorySpec


def uses_ext(spec: MemorySpec) -> bool:
    """Whether ``memory_scan`` runs this spec here (omega bias, muon or dgd learner)."""
    return spec.bias.kind == "omega" or spec.learner.kind in ("muon", "dgd")


# ------------------------------------------------------------------------------------------------- shared pieces


def _window_inputs(spec: MemorySpec, p: Prepared, gates: dict[str, Tensor], state: dict[str, Tensor] | None):
    """Keys, values, gamma ``[B, H, c-1+T, 1]`` and deltas extended by the carried window.

    Returns (k, v, gamma, delta, c - 1)."""
    omega = spec.bias.kind == "omega"
    c1 = spec.bias.window - 1 if omega else 0
    gamma = gates["omega_gamma"].to(p.k.dtype).transpose(1, 2)[..., None] if omega else None  # [B, H, T, 1]
    if c1 == 0:
        return p.k, p.v, gamma, p.delta, 0
    B, H = p.k.shape[:2]

    def prev(name: str, width: int) -> Tensor:
        if state is None:
            return p.k.new_zeros(B, H, c1, width)
        s = state[name].to(p.k.dtype)
        return s.expand(B, H, c1, width) if s.dim() == 3 else s

    k = torch.cat([prev("window_k", p.k.shape[-1]), p.k], 2)
    v = torch.cat([prev("window_v", p.v.shape[-1]), p.v], 2)
    g = torch.cat([prev("window_gamma", 1), gamma], 2)
    d = None if p.delta is None else torch.cat([prev("window_delta", 1), p.delta], 2)
    return k, v, g, d, c1


def _window_state(k: Tensor, v: Tensor, g: Tensor | None, d: Tensor | None, c1: int) -> dict[str, Tensor]:
    if c1 == 0:
        return {}
    out = {"window_k": k[:, :, -c1:], "window_v": v[:, :, -c1:], "window_gamma": g[:, :, -c1:]}
    if d is not None:
        out["window_delta"] = d[:, :, -c1:]
    return out


def _sl(x: Tensor | None, lo: int, hi: int) -> Tensor | None:
    return None if x is None else x[:, :, lo:hi]


# --------------------------------------------------------------------------------------------- recurrent oracle


def ext_recurrent_memory_scan(
    spec: MemorySpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: dict[str, Tensor],
    state: dict[str, Tensor] | None = None,
    *,
    params: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-by-token oracle for omega / muon / dgd (gradients by ``torch.func.vjp``; see the module docstring)."""
    p = prepare(spec, q, k, v, gates, state, params)
    mem, bias, ret, learner = p.comp.memory, p.comp.bias, p.comp.retention, p.comp.learner
    kind = spec.learner.kind
    kx, vx, gx, dx, c1 = _window_inputs(spec, p, gates, state)
    T = p.q.shape[2]
    A, S = list(p.W), None if p.S is None else list(p.S)
    nus = [ret.normalizer(a) for a in A]
    outs = []
    for t in range(T):
        i = t % p.chunk
        keep = p.keep[:, :, t] if p.keep is not None else None  # [B, H, R]
        lr = p.lr[:, :, t, None, None]
        if i == 0:
            Ws = A if nus[0] is None else [a / nu for a, nu in zip(A, nus)]
            gamma_run = torch.ones_like(keep) if keep is not None else None
        if keep is not None:
            gamma_run = gamma_run * keep
        P = [row_scale(w, gamma_run) for w in Ws] if ret.grad_at == "decayed" else Ws
        kw, vw = kx[:, :, t : t + c1 + 1], vx[:, :, t : t + c1 + 1]  # the window of token t

        def fwd(*weights: Tensor, kw: Tensor = kw) -> Tensor:
            return mem.forward(kw, list(weights), p.params)

        y, vjp_fn = torch.func.vjp(fwd, *P)
        R = bias.grad(y, vw, _sl(dx, t, t + c1 + 1))
        if gx is not None:
            R = R * gx[:, :, t : t + c1 + 1]
        g = vjp_fn(R)  # the window sum of the per-token gradients

        keep_w = 1.0 if keep is None else keep[..., None]  # [B, H, R, 1]: scales the rows of A
        if ret.lag:
            if i == 0:
                A = [ret.lag_step(a, gl, keep_w, lr, p.params) for a, gl in zip(A, g)]
            else:
                A = [keep_w * a - lr * gl for a, gl in zip(A, g)]
        else:
            mu = p.mu[:, :, t, None, None] if p.mu is not None else None
            kt = p.k[:, :, t : t + 1]
            new_A, new_S = [], []
            for layer, (a, gl) in enumerate(zip(A, g)):
                if kind == "dgd":
                    a_new, s_new = learner.step(a, None, gl, keep_w, lr, k=kt, layer=layer)
                else:
                    a_new, s_new = learner.step(a, None if S is None else S[layer], gl, keep_w, lr, mu)
                new_A.append(a_new)
                new_S.append(s_new)
            A, S = new_A, (new_S if S is not None else None)
            if i == p.chunk - 1 and nus[0] is not None:
                nus = [ret.normalizer(a) for a in A]
        W_read = A if nus[0] is None else [a / nu for a, nu in zip(A, nus)]
        outs.append(mem.forward(p.q[:, :, t : t + 1], W_read, p.params))
    o = torch.cat(outs, dim=2).transpose(1, 2)
    return o, {**final_state(A, S), **_window_state(kx, vx, gx, dx, c1)}


# ----------------------------------------------------------------------------------------------------- chunked


def _read_terms(mem, x, base, beta, terms, params, S0=None, f=None, inv_nu=None) -> Tensor:
    """Dual-form read ``y_t = M(x_t; W_t)`` with ``W_{l,t} = beta_t W_l0 + f_t S_l0 - sum_terms sum_j G[t,j] a_j^T d_j``.

    terms[l]: list of ``(G [B, H, n, m, R], a [B, H, m, in], d [B, H, m, out])`` (several per layer for DGD)."""
    h = x
    for layer in range(mem.depth):
        Hl = (h * beta) @ base[layer]
        for G, a, d in terms[layer]:
            Hl = Hl - masked_scores(h, a, G) @ d
        if S0 is not None:
            Hl = Hl + (h * f) @ S0[layer]
        if inv_nu is not None:
            Hl = Hl * inv_nu[layer]
        h = mem.act(Hl) if layer < mem.depth - 1 else Hl
    return mem.head(h, x, params)[0]


def _read_materialised(mem, x: Tensor, W: list[Tensor], params) -> Tensor:
    """``y_t = M(x_t; W_t)`` with per-token weights ``W_l: [B, H, n, in, out]`` (Muon's chunked read)."""
    h = x
    for layer, w in enumerate(W):
        h = (h[..., None, :] @ w)[..., 0, :]
        if layer < mem.depth - 1:
            h = mem.act(h)
    return mem.head(h, x, params)[0]


def _row_combine(E: Tensor, X: Tensor) -> Tensor:
    """``sum_r E[t, r] X_r`` with row-wise E ``[B, H, n, n, R]`` (R = 1 or the rows of X) and X ``[B, H, n, in, out]``."""
    if E.shape[-1] == 1:
        return torch.einsum("bhtr,bhrio->bhtio", E[..., 0], X)
    return torch.einsum("bhtri,bhrio->bhtio", E, X)


def _shift_rows(X: Tensor) -> Tensor:
    """``Y[t] = X[t-1]`` (``Y[0] = 0``) along the token axis -3 of ``[B, H, n, m, R]``."""
    return torch.cat([torch.zeros_like(X[:, :, :1]), X[:, :, :-1]], 2)


def ext_chunked_memory_scan(
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
    """Chunk-parallel omega / muon / dgd (see the module docstring); the Python loop runs over chunks only.

    ``reads=False`` skips the per-token reads and returns ``(None, final state)`` (as ``chunked_memory_scan``)."""
    p = prepare(spec, q, k, v, gates, state, params)
    mem, bias, ret, learner = p.comp.memory, p.comp.bias, p.comp.retention, p.comp.learner
    kind = spec.learner.kind
    kx_all, vx_all, gx_all, dx_all, c1 = _window_inputs(spec, p, gates, state)
    B, H, T, _ = p.q.shape
    b = p.chunk
    tiny = torch.finfo(p.q.dtype).tiny
    A, S = list(p.W), None if p.S is None else list(p.S)
    outs = []
    for s in range(0, T, b):
        n = min(b, T - s)
        qx, kc = p.q[:, :, s : s + n], p.k[:, :, s : s + n]
        lr = p.lr[:, :, s : s + n]
        log_keep = torch.log(p.keep[:, :, s : s + n].clamp_min(tiny)) if p.keep is not None else qx.new_zeros(B, H, n, 1)
        mu = _sl(p.mu, s, s + n)

        # 1. per-token gradient factors of the chunk and the window before it, at the chunk-start point
        nu0 = [ret.normalizer(a) for a in A]
        W0 = A if nu0[0] is None else [a / nu for a, nu in zip(A, nu0)]
        scale = torch.exp(torch.cumsum(log_keep, dim=2)) if ret.grad_at == "decayed" else None  # (c1 == 0 here)
        kw, vw = kx_all[:, :, s : s + c1 + n], vx_all[:, :, s : s + c1 + n]  # m = c1 + n tokens
        y, cache = mem.forward_cache(kw, W0, p.params, scale)
        R = bias.grad(y, vw, _sl(dx_all, s, s + c1 + n))
        if gx_all is not None:
            R = R * gx_all[:, :, s : s + c1 + n]
        acts, ds = mem.backward_rows(R, cache, W0)  # per layer: [B, H, m, in], [B, H, m, out]
        mix = torch.ones(n, c1 + n, dtype=qx.dtype, device=qx.device).triu(0).tril(c1) if c1 else None

        # 2. lag token of kl / elastic (gd only): non-linear step with the window gradient of token 0
        if ret.lag:
            w0 = mix[0] if mix is not None else torch.eye(1, n, dtype=qx.dtype, device=qx.device)[0]
            k0 = p.keep[:, :, s, :, None]  # [B, H, 1, 1]
            l0 = lr[:, :, :1, None]
            base = [ret.lag_step(w, (a * w0[:, None]).transpose(-1, -2) @ d, k0, l0, p.params) for w, a, d in zip(A, acts, ds)]
            log_keep = torch.cat([torch.zeros_like(log_keep[:, :, :1]), log_keep[:, :, 1:]], 2)
            lr = torch.cat([torch.zeros_like(lr[:, :, :1]), lr[:, :, 1:]], 2)
        else:
            base = A

        logc = torch.cumsum(log_keep, dim=2)  # [B, H, n, R]
        beta = torch.exp(logc)
        E = _decay_matrix(logc)  # [B, H, t, r, R]
        if kind == "muon":
            co = MomentumLearner(spec.learner).coefficients(log_keep, lr, mu)
            N = co.N if mix is None else torch.einsum("ji,bhjt->bhit", mix, co.N)  # [B, H, m, n]
            S_all = [co.m[..., None, None] * s0[:, :, None] - torch.einsum("bhit,bhia,bhid->bhtad", N, a, d)
                     for s0, a, d in zip(S, acts, ds)]  # fmt: skip
            A_all = [beta[..., None] * a0[:, :, None] + _row_combine(E, learner.orthogonalize(s_t))
                     for a0, s_t in zip(base, S_all)]  # fmt: skip
            A_end = [a[:, :, -1] for a in A_all]
            S_end = [s_t[:, :, -1] for s_t in S_all]
            W_read = A_all
            if nu0[0] is not None:
                inv = [(1.0 / nu).expand(B, H, n, 1) for nu in nu0]
                if n == b:
                    inv = [torch.cat([x[:, :, 1:], 1.0 / ret.normalizer(a)], 2) for x, a in zip(inv, A_end)]
                W_read = [a * x[..., None] for a, x in zip(A_all, inv)]
            if reads:
                outs.append(_read_materialised(mem, qx, W_read, p.params))
            A, S = A_end, S_end
            continue

        # gd / momentum / dgd: the dual form with the window folded into the coefficients
        if kind == "momentum":
            co = learner.coefficients(log_keep, lr, mu)
        else:  # gd, and dgd's gradient part
            co = _gd_coefficients(E, beta, lr)
        G = co.G if mix is None else torch.einsum("bhtjr,ji->bhtir", co.G, mix)  # [B, H, n, m, R]
        terms = [[(G, a, d)] for a, d in zip(acts, ds)]
        if kind == "dgd" and learner.projects(0):
            Eprev, Gprev = _shift_rows(E), _shift_rows(G)
            bprev = torch.exp(logc - log_keep)  # beta_{t-1}, 1 at the chunk's first token
            rhs = (kc * bprev) @ base[0] - masked_scores(kc, acts[0], Gprev) @ ds[0]  # [B, H, n, out]
            L = lr[..., None] * masked_scores(kc, kc, Eprev)  # strictly lower triangular [B, H, n, n]
            eye = torch.eye(n, dtype=qx.dtype, device=qx.device)
            Pp = torch.linalg.solve_triangular(eye + L, lr[..., None] * rhs, upper=False, unitriangular=True)
            terms[0].append((E, kc, Pp))

        # 4. end-of-chunk state
        A_end = []
        for layer, w in enumerate(base):
            a_new = w * beta[:, :, -1, :, None]
            for Gt, a, d in terms[layer]:
                a_new = a_new - (a * Gt[:, :, -1]).transpose(-1, -2) @ d
            A_end.append(a_new)
        S_end = None
        if S is not None:
            N = co.N if mix is None else torch.einsum("ji,bhjt->bhit", mix, co.N)  # [B, H, m, n]
            A_end = [x + s0 * co.f[:, :, -1, :, None] for x, s0 in zip(A_end, S)]
            m_e = co.m[:, :, -1, None, None]
            S_end = [s0 * m_e - (a * N[..., -1:]).transpose(-1, -2) @ d for s0, a, d in zip(S, acts, ds)]

        # 3. reads
        if not reads:
            A, S = A_end, S_end
            continue
        inv_nu = None
        if nu0[0] is not None:
            inv_nu = [(1.0 / nu).expand(B, H, n, 1) for nu in nu0]
            if n == b:
                inv_nu = [torch.cat([x[:, :, 1:], 1.0 / ret.normalizer(a)], 2) for x, a in zip(inv_nu, A_end)]
        outs.append(_read_terms(mem, qx, base, beta, terms, p.params, S0=S, f=co.f, inv_nu=inv_nu))
        A, S = A_end, S_end
    o = torch.cat(outs, dim=2).transpose(1, 2) if reads else None
    return o, {**final_state(A, S), **_window_state(kx_all, vx_all, gx_all, dx_all, c1)}


class _Coefficients:
    def __init__(self, beta: Tensor, G: Tensor) -> None:
        self.beta, self.G, self.f, self.m, self.N = beta, G, None, None, None


def _gd_coefficients(E: Tensor, beta: Tensor, lr: Tensor) -> _Coefficients:
    """GD coefficients ``G[t, j] = E[t, j] eta_j`` from a precomputed decay matrix (DGD's gradient part)."""
    return _Coefficients(beta, E * lr[:, :, None, :, None])


__all__ = ["ext_chunked_memory_scan", "ext_recurrent_memory_scan", "uses_ext"]
