"""A small float64 token-by-token oracle of the linear-memory scan (chunk-start gradients), for the kernel tests.

Written independently of the kernels: a plain loop over tokens, the Miras/Titans update per token
(A_t = alpha_t A_{t-1} - eta_t g_t, or S_t = mu_t S_{t-1} - eta_t g_t, A_t = alpha_t A_{t-1} + S_t) with
g_t = k_t^T R(k_t P_t, v_t) at the chunk-start point P_t, and the read o_t = q_t W_t after the update.
Outer gradients come from autograd through the loop.
"""

from __future__ import annotations

import torch

from miras.spec import MemorySpec


def bias_grad(spec, y, v, delta, stats=None):
    """dl/dy for the spec's bias (ops.md conventions). y, v: [B, H, V]; delta: [B, H] or None."""
    kind = spec.bias.kind
    if kind == "dot":
        return -v
    r = y - v
    if kind == "l2":
        return r
    a = spec.bias.smoothing
    if kind == "lp":
        p, eps = spec.bias.p, spec.bias.eps
        return p * torch.tanh(a * r) * (r * r + eps) ** ((p - 1) / 2)
    small = r.norm(dim=-1, keepdim=True) <= delta[..., None]
    if stats is not None:
        stats["small"] = stats.get("small", 0) + int(small.sum())
        stats["rows"] = stats.get("rows", 0) + small.numel()
    return torch.where(small, r, delta[..., None] * torch.tanh(a * r))


def oracle_scan(spec, q, k, v, gates, state=None, stats=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    b = spec.learner.chunk_size
    zeros = q.new_zeros(B, H, K, V)
    W = state["W1"].expand(B, H, K, V) if state and "W1" in state else zeros
    S = state["S1"].expand(B, H, K, V) if state and "S1" in state else zeros
    decay = spec.retention.kind == "decay"
    decayed = decay and spec.retention.grad_at == "decayed"
    mom = spec.learner.kind == "momentum"
    outs = []
    for c0 in range(0, T, b):
        Ws = W
        gamma = q.new_ones(B, H)
        for t in range(c0, min(c0 + b, T)):
            alpha = gates["keep"][:, t] if decay else q.new_ones(B, H)
            gamma = gamma * alpha
            P = Ws * gamma[..., None, None] if decayed else Ws
            y = torch.einsum("bhk,bhkv->bhv", k[:, t], P)
            R = bias_grad(spec, y, v[:, t], gates.get("huber_delta", q.new_ones(B, T, H))[:, t], stats)
            g = k[:, t, :, :, None] * R[:, :, None, :]  # [B, H, K, V]
            eta = gates["lr"][:, t, :, None, None]
            if mom:
                S = gates["momentum"][:, t, :, None, None] * S - eta * g
                W = alpha[..., None, None] * W + S
            else:
                W = alpha[..., None, None] * W - eta * g
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], W))
    final = {"W1": W}
    if mom:
        final["S1"] = S
    return torch.stack(outs, 1), final


def float64_draws(seed: int):
    """(r, u) drawing float64 tensors from one seeded generator: r(*shape) normal, u(lo, hi, *shape) uniform."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    def u(lo, hi, *s):
        return lo + (hi - lo) * torch.rand(*s, generator=g, dtype=torch.float64)

    return r, u


def rel(a, b) -> float:
    return (a.double() - b.double()).norm().item() / max(b.double().norm().item(), 1e-30)



def reference_scan(spec, q, k, v, gates, state=None):
    """The project's recurrent oracle (miras.ops, mode="recurrent") when it exists, else ``oracle_scan``."""
    try:
        from miras.ops import memory_scan
    except ImportError:
        return oracle_scan(spec, q, k, v, gates, state)
    return memory_scan(spec, q, k, v, gates, state, mode="recurrent")


def make_spec(bias="l2", retention="decay", learner="momentum", grad_at="previous", chunk=16) -> MemorySpec:
    ret = {"kind": retention, "grad_at": grad_at} if retention == "decay" else {"kind": retention}
    return MemorySpec(memory="linear", bias=bias, retention=ret, learner={"kind": learner, "chunk_size": chunk})


def gate_names(spec: MemorySpec) -> list[str]:
    names = ["lr"]
    if spec.retention.kind == "decay":
        names.append("keep")
    if spec.learner.kind == "momentum":
        names.append("momentum")
    if spec.bias.kind == "huber":
        names.append("huber_delta")
    return names


def make_inputs(spec, B, T, H, K, V, *, init_state=True, seed=0, device="cpu", dtype=torch.float32):
    """Random leaf inputs in sensible ranges: q, k, v in ``dtype``, gates and states fp32.

    Huber's delta is scaled to ~||r|| so both branches of the switch occur. The Lp bias (p = 3: gradients ~ p |r|^2)
    gets a 10x smaller learning rate: with the l2 range its memory diverges (|W| ~ 1e93 at T=100, D=40 in the float64
    oracle), and a diverging memory checks nothing (``check_errors`` refuses such a reference).
    """
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g)

    x = {
        "q": r(B, T, H, K) / K**0.5,
        "k": torch.nn.functional.normalize(r(B, T, H, K), dim=-1),
        "v": r(B, T, H, V),
    }
    ranges = {"lr": (0.05, 0.6), "keep": (0.8, 1.0), "momentum": (0.3, 0.95), "huber_delta": (0.5 * V**0.5, 1.7 * V**0.5)}
    if spec.bias.kind == "lp":
        ranges["lr"] = (0.005, 0.06)
    for name in gate_names(spec):
        lo, hi = ranges[name]
        x[name] = lo + (hi - lo) * torch.rand(B, T, H, generator=g)
    if init_state:
        x["W1"] = 0.3 * r(B, H, K, V)
        if spec.learner.kind == "momentum":
            x["S1"] = 0.1 * r(B, H, K, V)
    return {n: t.to(device=device, dtype=dtype if n in "qkv" else torch.float32).requires_grad_(True) for n, t in x.items()}


def split(spec, x):
    gates = {n: x[n] for n in gate_names(spec)}
    state = {n: x[n] for n in ("W1", "W2", "S1", "S2") if n in x} or None  # linear: W1 (S1); 2-layer MLP: W2, S2 too
    return x["q"], x["k"], x["v"], gates, state


# leaves of x passed as ``params``: an MLP memory's LayerNorm head, elastic-net retention's thresholds per head
MEMORY_PARAMS = ("norm_weight", "norm_bias", "threshold")


def run_and_grads(fn, spec, x, cot, **kw):
    """(outputs, final state, grads of every input) for one scan; cot = cotangents of o and the final state. x may
    hold the memory's parameters (``MEMORY_PARAMS``): they go to fn as ``params``, and get their grads too."""
    q, k, v, gates, state = split(spec, x)
    params = {n: x[n] for n in MEMORY_PARAMS if n in x}
    o, final = fn(spec, q, k, v, gates, state, **kw, **({"params": params} if params else {}))
    loss = (o * cot["o"].to(o.dtype)).sum() + sum((final[n] * cot[n].to(final[n].dtype)).sum() for n in final)
    names = list(x)
    grads = torch.autograd.grad(loss, [x[n] for n in names])
    return o, final, dict(zip(names, grads))


GATE_LEAVES = ("lr", "keep", "momentum", "omega_gamma", "huber_delta")  # leaves of x that memory_scan takes as gates


def memory_scan_grads(spec, x: dict[str, torch.Tensor], cot: dict[str, torch.Tensor], dtype, mode: str, device,
                      low_precision=("q", "k", "v")):
    """(o, final state, grads of every leaf of x) for one ``miras.ops.memory_scan`` of float64 leaves x cast to
    ``dtype`` on ``device``: the gates (``GATE_LEAVES``), the state (W*, S*, the omega window's ``window_*``) and the
    memory's ``MEMORY_PARAMS`` are picked out of x by name. A 16-bit dtype casts only ``low_precision`` leaves
    (the rest go in fp32). cot: cotangents of o and of the final-state entries to take (others are left out)."""
    from miras.ops import memory_scan

    low = dtype in (torch.bfloat16, torch.float16)
    leaves = {n: t.to(device, dtype if not low or n in low_precision else torch.float32).requires_grad_(True)
              for n, t in x.items()}
    gates = {n: leaves[n] for n in GATE_LEAVES if n in leaves}
    state = {n: t for n, t in leaves.items() if n[0] in "WS" or n.startswith("window_")} or None
    params = {n: leaves[n] for n in MEMORY_PARAMS if n in leaves} or None
    o, final = memory_scan(spec, leaves["q"], leaves["k"], leaves["v"], gates, state, params=params, mode=mode)
    final = {n: t for n, t in final.items() if n in cot}
    loss = (o * cot["o"].to(o)).sum() + sum((final[n] * cot[n].to(final[n])).sum() for n in final)
    return o, final, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


REFERENCE_BOUND = 1e3  # a reference output or state above this means the test case diverged, not that it passed


def check_errors(got, ref, tol: float, label: str | None = None) -> dict[str, float]:
    """Relative errors of the outputs, every final state and every gradient of two ``run_and_grads`` results; fails
    when one is not below tol (which also catches NaN). With a label the errors are printed on one line."""
    (o, fin, gr), (o_ref, fin_ref, gr_ref) = got, ref
    size = max(float(o_ref.detach().abs().max()), *(float(s.detach().abs().max()) for s in fin_ref.values()))
    assert size < REFERENCE_BOUND, (f"the reference itself diverged (max |o|, |state| = {size:.3g}): the test inputs "
                                    "must keep the memory bounded, or the comparison checks nothing")
    errs = {"o": rel(o, o_ref), **{f"state.{n}": rel(fin[n], fin_ref[n]) for n in fin_ref},
            **{f"d{n}": rel(gr[n], gr_ref[n]) for n in gr_ref}}  # fmt: skip
    if label is not None:
        print(f"{label}: " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return errs
