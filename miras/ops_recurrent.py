"""The recurrent oracle of ``memory_scan``: one token at a time, the definition every faster form must match.

Per token t of a chunk starting at s (chunk-start read weights W_s, running keep product gamma_t over the chunk):

    P_t = W_s  (grad_at previous)  or  diag(gamma_t) W_s  (grad_at decayed)     gradient point (Titans Eq. 16, Miras Eq. 28)
    g_t = vjp of the memory forward at P_t with the bias rows R(M(k_t; P_t), v_t)   (autograd: independent of the
          hand-written backward of the chunked form)
    linear family: (A, S) <- learner step with keep alpha_t ;  W_t = A_t / nu_t (lq) or A_t
    kl / elastic:  W_t = lag_step(W_{t-1}, g_t) at the first token of a chunk, else alpha_t W_{t-1} - eta_t g_t
    o_t = M(q_t; W_t)                                                               (read after the write)
"""

from __future__ import annotations

import torch
from torch import Tensor

from miras.ops_common import final_state, prepare, row_scale
from miras.spec import MemorySpec


def recurrent_memory_scan(
    spec: MemorySpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: dict[str, Tensor],
    state: dict[str, Tensor] | None = None,
    *,
    params: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-by-token ``memory_scan`` (see :func:`miras.ops.memory_scan` for the contract). Slow; exact."""
    from miras.ops_ext import ext_recurrent_memory_scan, uses_ext

    if uses_ext(spec):  # omega bias, muon / dgd learners (ATLAS, NL): miras.ops_ext
        return ext_recurrent_memory_scan(spec, q, k, v, gates, state, params=params)
    p = prepare(spec, q, k, v, gates, state, params)
    mem, bias, ret, learner = p.comp.memory, p.comp.bias, p.comp.retention, p.comp.learner
    B, H, T, _ = p.q.shape
    depth = len(p.W)
    A, S = list(p.W), None if p.S is None else list(p.S)
    nus = [ret.normalizer(a) for a in A]  # lq: nu of the last chunk end (initial state first)
    outs = []
    for t in range(T):
        i = t % p.chunk
        chunk_end = i == p.chunk - 1  # a full chunk ends here (a call's partial last chunk never refreshes nu)
        keep = p.keep[:, :, t] if p.keep is not None else None  # [B, H, R]
        lr = p.lr[:, :, t, None, None]  # [B, H, 1, 1]
        if i == 0:  # chunk start: gradient point base and keep product
            Ws = A if nus[0] is None else [a / nu for a, nu in zip(A, nus)]
            gamma = torch.ones_like(keep) if keep is not None else None
        if keep is not None:
            gamma = gamma * keep
        P = [row_scale(w, gamma) for w in Ws] if ret.grad_at == "decayed" else Ws
        kt, vt = p.k[:, :, t : t + 1], p.v[:, :, t : t + 1]  # [B, H, 1, K|V]

        def fwd(*weights: Tensor, kt: Tensor = kt) -> Tensor:
            return mem.forward(kt, list(weights), p.params)

        y, vjp_fn = torch.func.vjp(fwd, *P)
        delta = None if p.delta is None else p.delta[:, :, t : t + 1]
        g = vjp_fn(bias.grad(y, vt, delta))  # tuple of [B, H, in, out]

        one = keep is None
        if ret.lag:
            if i == 0:
                A = [ret.lag_step(a, gl, keep[..., None], lr, p.params) for a, gl in zip(A, g)]
            else:
                A = [row_scale(a, keep) - lr * gl for a, gl in zip(A, g)]
        else:
            mu = p.mu[:, :, t, None, None] if p.mu is not None else None
            new_A, new_S = [], []
            for layer in range(depth):
                a_prev = A[layer] if one else row_scale(A[layer], keep)
                a_new, s_new = learner.step(a_prev, None if S is None else S[layer], g[layer], 1.0, lr, mu)
                new_A.append(a_new)
                new_S.append(s_new)
            A, S = new_A, (new_S if S is not None else None)
            if chunk_end and nus[0] is not None:
                nus = [ret.normalizer(a) for a in A]
        W_read = A if nus[0] is None else [a / nu for a, nu in zip(A, nus)]
        outs.append(mem.forward(p.q[:, :, t : t + 1], W_read, p.params))
    o = torch.cat(outs, dim=2).transpose(1, 2)  # [B, T, H, V]
    return o, final_state(A, S)
