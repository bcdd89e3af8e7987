"""Shared input handling of the memory ops: validation and conversion to the internal ``[B, H, T, .]`` layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from miras.components.bias import Bias
from miras.components.learner import Learner
from miras.components.memory import MLPMemory, layer_dims, memory_param_shapes, window_state_shapes
from miras.registry import BIAS, LEARNER, MEMORY, RETENTION
from miras.spec import MemorySpec


@dataclass
class Components:
    memory: MLPMemory
    bias: Bias
    retention: object
    learner: Learner


def components(spec: MemorySpec) -> Components:
    """Instantiate the four axes of a memory spec from the registries."""
    return Components(
        memory=MEMORY.get(spec.memory.kind)(spec),
        bias=BIAS.get(spec.bias.kind)(spec.bias),
        retention=RETENTION.get(spec.retention.kind)(spec.retention),
        learner=LEARNER.get(spec.learner.kind)(spec.learner),
    )


def required_gates(spec: MemorySpec) -> set[str]:
    """The gate names ``memory_scan`` needs for this spec."""
    comp = components(spec)
    names = set(comp.learner.gates) | set(comp.bias.gates)
    if comp.retention.needs_keep:
        names.add("keep")
    return names


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def check_inputs(
    spec: MemorySpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: dict[str, Tensor],
    state: dict[str, Tensor] | None,
    params: dict[str, Tensor] | None,
) -> None:
    """Raise ValueError naming the argument for every malformed input of ``memory_scan``."""
    where = "memory_scan"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = _shape(x) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{where}: {name} must be a 4-d tensor [B, T, H, features], but got {name}={got}.")
    if q.shape != k.shape:
        raise ValueError(f"{where}: q and k must have the same shape [B, T, H, K], but got q={_shape(q)}, k={_shape(k)}.")
    B, T, H, K = q.shape
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{where}: v must be [B, T, H, V] with B, T, H of q, but got v={_shape(v)}, q={_shape(q)}.")
    V = v.shape[-1]
    mem = spec.memory
    if mem.kind == "mlp" and mem.residual and K != V:
        raise ValueError(f"{where}: a residual MLP memory needs d_key == d_value, but got K={K}, V={V}.")
    if not isinstance(gates, dict):
        raise ValueError(f"{where}: gates must be a dict of tensors, but got gates={type(gates).__name__}.")
    need = required_gates(spec)
    missing, extra = need - set(gates), set(gates) - need
    if missing or extra:
        raise ValueError(
            f"{where}: gates must hold exactly {sorted(need)} for memory {spec.axes}, but got gates={sorted(gates)} "
            f"(missing {sorted(missing)}, unexpected {sorted(extra)})."
        )
    channel_ok = spec.retention.kind == "decay" and mem.kind == "linear"
    for name, g in gates.items():
        ok = isinstance(g, Tensor) and (
            tuple(g.shape) == (B, T, H) or (name == "keep" and channel_ok and tuple(g.shape) == (B, T, H, K))
        )
        if not ok:
            allowed = f"[{B}, {T}, {H}]" + (f" or [{B}, {T}, {H}, {K}]" if name == "keep" and channel_ok else "")
            got = _shape(g) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"{where}: gates[{name!r}] must have shape {allowed}, but got gates[{name!r}]={got}.")
    dims = layer_dims(spec, K, V)
    if state is not None:
        if not isinstance(state, dict):
            raise ValueError(f"{where}: state must be a dict of tensors or None, but got state={type(state).__name__}.")
        expect = {f"W{i + 1}": d for i, d in enumerate(dims)}
        if spec.learner.kind in ("momentum", "muon"):
            expect.update({f"S{i + 1}": d for i, d in enumerate(dims)})
        expect.update(window_state_shapes(spec, K, V))  # omega bias window (ops_ext)
        if set(state) != set(expect):
            raise ValueError(f"{where}: state must hold keys {sorted(expect)}, but got state keys {sorted(state)}.")
        for name, d in expect.items():
            s = state[name]
            if tuple(s.shape) not in ((B, H, *d), (H, *d)):
                raise ValueError(
                    f"{where}: state[{name!r}] must have shape [{B}, {H}, {d[0]}, {d[1]}] or [{H}, {d[0]}, {d[1]}], "
                    f"but got state[{name!r}]={_shape(s)}."
                )
    pshapes = memory_param_shapes(spec, K, V)
    given = params or {}
    missing = set(pshapes) - set(given)
    if missing:
        raise ValueError(
            f"{where}: params must hold {sorted(pshapes)} for memory {spec.axes}, but got params={sorted(given)}."
        )
    for name, shp in pshapes.items():
        p = given[name]
        if tuple(p.shape) != (H, *shp):
            raise ValueError(f"{where}: params[{name!r}] must have shape {[H, *shp]}, but got params[{name!r}]={_shape(p)}.")


@dataclass
class Prepared:
    """Inputs in the internal layout: q, k ``[B, H, T, K]``, v ``[B, H, T, V]``, lr/mu ``[B, H, T]``,
    keep ``[B, H, T, R]`` (None for retention none), delta ``[B, H, T, 1]``, W/S lists of ``[B, H, in, out]``."""

    q: Tensor
    k: Tensor
    v: Tensor
    lr: Tensor
    keep: Tensor | None
    mu: Tensor | None
    delta: Tensor | None
    W: list[Tensor]
    S: list[Tensor] | None
    params: dict[str, Tensor] | None
    comp: Components
    chunk: int


def prepare(spec, q, k, v, gates, state, params) -> Prepared:
    B, T, H, K = q.shape
    V = v.shape[-1]
    comp = components(spec)
    dims = layer_dims(spec, K, V)

    def init(name: str, d: tuple[int, int]) -> Tensor:
        if state is None:
            return q.new_zeros(B, H, *d)
        s = state[name].to(q.dtype)
        return s.expand(B, H, *d) if s.dim() == 3 else s

    W = [init(f"W{i + 1}", d) for i, d in enumerate(dims)]
    S = [init(f"S{i + 1}", d) for i, d in enumerate(dims)] if comp.learner.momentum else None
    keep = gates.get("keep")
    if keep is not None:
        keep = keep.transpose(1, 2)
        keep = keep[..., None] if keep.dim() == 3 else keep  # [B, H, T, R]
    mu = gates.get("momentum")
    delta = gates.get("huber_delta")
    return Prepared(
        q=q.transpose(1, 2),
        k=k.transpose(1, 2),
        v=v.transpose(1, 2),
        lr=gates["lr"].transpose(1, 2),
        keep=keep,
        mu=None if mu is None else mu.transpose(1, 2),
        delta=None if delta is None else delta.transpose(1, 2)[..., None],
        W=W,
        S=S,
        params=params,
        comp=comp,
        chunk=spec.learner.chunk_size,
    )


def chunk_major(x: Tensor, n_chunks: int, b: int, fill: float) -> Tensor:
    """``[B, H, T, ...]`` -> chunk-major ``[n_chunks, B, H, b, ...]`` (contiguous), padding the last chunk with ``fill``.

    Chunk-major so that the per-chunk slices of everything derived from it are free views of contiguous memory.
    """
    B, H, T = x.shape[:3]
    pad = n_chunks * b - T
    if pad:
        x = torch.cat([x, x.new_full((B, H, pad, *x.shape[3:]), fill)], dim=2)
    return x.reshape(B, H, n_chunks, b, *x.shape[3:]).movedim(2, 0).contiguous()


def final_state(W: list[Tensor], S: list[Tensor] | None) -> dict[str, Tensor]:
    out = {f"W{i + 1}": w for i, w in enumerate(W)}
    if S is not None:
        out.update({f"S{i + 1}": s for i, s in enumerate(S)})
    return out


def stacked_rows(x: Tensor, w: Tensor, w_s: Tensor | None) -> Tensor:
    """``[x ⊙ w, x ⊙ w_s]`` along the last axis (``x ⊙ w`` for gd, w_s None): the row factors of the stacked state
    ``X = [A; S]``, those of A first (a cat of products: cheaper in the backward than a product of a cat)."""
    return x * w if w_s is None else torch.cat([x * w, x * w_s], dim=-1)


def stacked_decay(co) -> Tensor:
    """``D = [[beta_e, f_e], [0, m_e]]`` per chunk and head, ``[NC, B, H, 2, 2]`` (``[[beta_e]]``, ``[.., 1, 1]`` for
    gd): the end-of-chunk map ``X_e = D X + ...`` of the stacked state ``X = [A; S]`` with one keep per head (R = 1)."""
    if co.f is None:
        return co.beta_e[..., None]
    beta_e, f_e, m_e = co.beta_e[..., 0], co.f_e[..., 0], co.m_e
    return torch.stack([beta_e, f_e, torch.zeros_like(m_e), m_e], -1).unflatten(-1, (2, 2))


def row_scale(x: Tensor, scale: Tensor) -> Tensor:
    """``diag(scale) x`` on the rows (input axis) of weights ``[B, H, in, out]``; scale ``[B, H, 1|in]``."""
    return x * scale[..., :, None]


__all__ = [
    "Components",
    "Prepared",
    "check_inputs",
    "chunk_major",
    "components",
    "final_state",
    "prepare",
    "required_gates",
    "row_scale",
    "stacked_decay",
    "stacked_rows",
]
