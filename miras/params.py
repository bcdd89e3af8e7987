"""Parameter counts, recurrent-state sizes, the budget solver and the memory path of each layer, computed from the spec
alone (no module is built).

:func:`count_params` mirrors :mod:`miras.compiler` term by term; a test checks it against ``sum(p.numel())`` of the
built model for every recipe and for randomly drawn specs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from miras.errors import SpecError
from miras.spec import MemorySpec, ModelSpec


@dataclass(frozen=True)
class Row:
    """One line of :func:`breakdown`: ``layer`` is -1 for model-level parts (embedding, final norm, head)."""

    layer: int
    component: str
    count: int


def _norm_count(kind: str, d_model: int) -> int:
    return d_model if kind == "rmsnorm" else 2 * d_model


def _mixer_rows(mem: MemorySpec, *, d_model: int, n_heads: int, d_head: int, prefix: str = "") -> list[tuple[str, int]]:
    """Parameters of one MemoryMixer, by component."""
    from miras.components.gates import gate_param_count
    from miras.components.memory import memory_param_shapes, state_shapes
    from miras.components.mixer import mixer_gate_specs

    inner = n_heads * d_head
    rows = [("memory.projections", 3 * d_model * inner)]
    if mem.conv_size:
        rows.append(("memory.conv", 3 * inner * mem.conv_size))
    from miras.components.feature_maps import feature_dim

    dk = feature_dim(mem.feature_map, d_head)  # memory key dim (1 + d + d^2 for the exponential feature map)
    gates = sum(gate_param_count(g, d_model=d_model, n_heads=n_heads, d_key=dk) for g in mixer_gate_specs(mem).values())
    rows.append(("memory.gates", gates))
    if mem.feature_map.kind == "polynomial" and mem.feature_map.learnable:
        rows.append(("memory.feature_map", mem.feature_map.degree))
    init = sum(math.prod(s) for k, s in state_shapes(mem, dk, d_head).items() if k.startswith("W"))
    rows.append(("memory.initial_state", n_heads * init))
    mparams = sum(math.prod(s) for s in memory_param_shapes(mem, dk, d_head).values())
    if mparams:
        rows.append(("memory.norm_threshold", n_heads * mparams))
    if mem.output_norm:
        rows.append(("memory.output_norm", d_head))
    if mem.output_gate:
        rows.append(("memory.output_gate", d_model * inner))
    rows.append(("memory.out_projection", inner * d_model))
    if mem.caching.gated:  # Memory Caching connector projection W_u (MC §3.2)
        rows.append(("memory.caching_connector", d_model * d_model))
    if mem.local is not None:  # TNT: gates / initial state / memory params per memory (miras/components/tnt.py)
        from miras.components.tnt import tnt_mixer_rows

        rows = tnt_mixer_rows(mem, rows)
    return [(prefix + name, n) for name, n in rows]


def _other_memory_rows(spec: ModelSpec, kind: str) -> list[tuple[str, int]]:
    """Parameters of a Trellis or MS-SSM mixer (miras/components/trellis.py, msssm.py)."""
    if kind == "trellis":
        from miras.components.trellis import trellis_param_count

        return [("trellis", trellis_param_count(spec.trellis, d_model=spec.d_model, n_heads=spec.n_heads,
                                                d_head=spec.d_head))]
    from miras.components.msssm import msssm_param_count

    return [("msssm", msssm_param_count(spec.msssm, d_model=spec.d_model))]


def _block_rows(spec: ModelSpec, kind: str) -> list[tuple[str, int]]:
    from miras.components.attention import attention_param_count

    dims = {"d_model": spec.d_model, "n_heads": spec.n_heads, "d_head": spec.d_head}
    rows: list[tuple[str, int]] = []
    if kind in ("trellis", "msssm"):  # Trellis / MS-SSM blocks: the mixer alone
        return _other_memory_rows(spec, kind)
    if kind != "lmm" and spec.attention.persistent_tokens:
        rows.append(("persistent_tokens", spec.attention.persistent_tokens * spec.d_model))
    if kind != "lmm":
        rows.append(("attention", attention_param_count(**dims)))
    if kind == "lmm" or (kind in ("mac", "mag", "mal") and spec.hybrid_memory == "lmm"):
        rows += _mixer_rows(spec.memory, **dims)
    elif kind in ("mac", "mag", "mal"):  # hybrid_memory: trellis | msssm
        rows += _other_memory_rows(spec, spec.hybrid_memory)
    if kind == "selfmod":  # self-modifying Titans (hope: miras/components/selfmod.py)
        from miras.components.selfmod import selfmod_param_rows

        rows = selfmod_param_rows(spec.memory, **dims)
    if kind == "mag":
        rows.append(("mag.gate_norms", 2 * spec.d_model))
    return rows


def breakdown(spec: ModelSpec) -> list[Row]:
    """Parameter count per layer and component (embedding, projections, conv, gates, feature map, memory initial state,
    memory norm/threshold params, attention, persistent tokens, channel MLP with its taper width, norms, head)."""
    from miras.components.mlp import mlp_param_count, taper_widths

    d = spec.d_model
    rows = [Row(-1, "embedding", spec.vocab_size * d)]
    widths = taper_widths(spec)
    for i, kind in enumerate(spec.blocks):
        rows.append(Row(i, "norm", _norm_count(spec.norm, d)))
        rows += [Row(i, f"{kind}.{name}", n) for name, n in _block_rows(spec, kind)]
        if spec.mlp.kind != "none":
            rows.append(Row(i, "mlp_norm", _norm_count(spec.norm, d)))
            if spec.mlp.kind == "cms":  # Continuum Memory System (hope: miras/components/cms.py)
                from miras.components.cms import cms_param_count

                n_mlp = cms_param_count(spec.mlp.cms, d_model=d, width=widths[i])
            else:
                n_mlp = mlp_param_count(spec.mlp.kind, d_model=d, width=widths[i])
            rows.append(Row(i, f"mlp.{spec.mlp.kind}[width={widths[i]}]", n_mlp))
    rows.append(Row(-1, "final_norm", _norm_count(spec.norm, d)))
    if not spec.tie_embeddings:
        rows.append(Row(-1, "head", spec.vocab_size * d))
    return rows


ATTENTION_BLOCKS = ("attn", "swa")  # PyTorch's scaled_dot_product_attention
OWN_RECURRENCE_BLOCKS = ("trellis", "msssm")  # their own PyTorch recurrences, not memory_scan
HYBRID_BLOCKS = ("mac", "mag", "mal")  # attention and a memory: the lmm memory layer, or ``hybrid_memory``'s mixer


def block_path(spec: ModelSpec, block: str, device: str = "cuda") -> str:
    """Which implementation runs a ``block`` layer's token mixing on ``device`` (``"cpu"`` or ``"cuda"``), as
    ``"<mode>[: <reason>]"``: ``"sdpa"`` (attention), ``"pytorch: ..."`` (a block with its own recurrence),
    ``"triton"``, or ``"chunked"`` with, on CUDA, the piece no kernel covers yet (``miras.kernels.kernel_support``,
    the head dims beyond the kernels': ``shape_gap``, or a part of the block that has its own scan)."""
    if block in ATTENTION_BLOCKS:
        return "sdpa"
    mixer = block if block in OWN_RECURRENCE_BLOCKS else spec.hybrid_memory if block in HYBRID_BLOCKS else "lmm"
    if mixer in OWN_RECURRENCE_BLOCKS:  # (a mac / mag / mal hybrid's memory may be one of them: hybrid_memory)
        return f"pytorch: the {mixer} mixer's own recurrence (no memory_scan, no Triton kernel)"
    mem = spec.memory
    if mem.caching.kind == "soup" and mem.retention.kind not in ("kl", "elastic"):  # caching.MemoryCaching._soup_scan
        return ("chunked" if device != "cuda" else
                "chunked: memory.caching.kind='soup' reads a mix of per-token and cached weights in its own chunked "
                "scan (no Triton kernel)")
    if block == "selfmod":  # (miras/components/selfmod.py: its projection memories write chunks of selfmod.chunk_size)
        return _selfmod_path(spec, device)
    if mem.local is None:
        return _scan_path(spec, mem, device)
    from miras.components.tnt import plain_memory_spec  # TNT: its local memories scan, its global memory is read

    local = [_scan_path(spec, plain_memory_spec(mem, c), device) for c in mem.local.chunk_sizes]
    path = next((p for p in local if p != "triton"), "triton")
    if path == "triton" and mem.local.global_memory:
        return "triton: the TNT local memories (the global memory writes its chunks on the chunked path)"
    return path


def _selfmod_path(spec: ModelSpec, device: str) -> str:
    """A self-modifying Titans block's path: its output memory scans with the memory's chunk, its projection
    memories (k, v, eta, alpha) with ``selfmod.chunk_size``, so that the two may take different paths."""
    from miras.components.selfmod import projection_spec

    out = _scan_path(spec, spec.memory, device)
    proj = _scan_path(spec, projection_spec(spec.memory, spec.selfmod), device)
    if out == proj:
        return out
    if proj == "triton":
        return f"triton: the projection memories (the output memory's scan is {out})"
    if out == "triton":
        return f"triton: the output memory (the projection memories' scan is {proj})"
    return out


def _scan_path(spec: ModelSpec, mem: MemorySpec, device: str) -> str:
    """The path of ``memory_scan(mem, ...)`` in ``auto`` mode on ``device`` at the model's head dims."""
    from miras.ops import kernel_gap, resolve_mode

    mode = resolve_mode(mem, device=device)
    if device != "cuda":
        return mode
    if mode == "chunked":
        return f"chunked: {kernel_gap(mem).split(';')[0]}"
    from miras.kernels import shape_gap

    gap = shape_gap(mem, 1, 1, spec.n_heads, spec.d_head, spec.d_head)
    return f"chunked: {gap}" if gap else "triton"


def memory_path(spec: ModelSpec, device: str = "cuda") -> str:
    """:func:`block_path` of the model's layers, for a run record: the memory layers' path (``triton``,
    ``chunked[: reason]``), else that of its other blocks (``sdpa``, ``pytorch: ...``); distinct paths joined by
    `` + ``."""
    paths = list(dict.fromkeys(block_path(spec, block, device) for block in spec.blocks))
    memory = [p for p in paths if p != "sdpa"]
    return " + ".join(memory) if memory else "sdpa"


def layer_paths(spec: ModelSpec) -> list[tuple[int, str, str]]:
    """(layer, block kind, path) for each layer: ``"<cpu mode> (cpu) / <cuda mode> (cuda)[: reason]"`` from
    :func:`block_path` on both devices, or ``"sdpa"`` for an attention block."""
    out = []
    for i, block in enumerate(spec.blocks):
        cuda = block_path(spec, block, "cuda")
        if cuda == "sdpa":
            out.append((i, block, cuda))
            continue
        mode, _, why = cuda.partition(": ")
        cpu = block_path(spec, block, "cpu").partition(": ")[0]
        out.append((i, block, f"{cpu} (cpu) / {mode} (cuda)" + (f": {why}" if why else "")))
    return out


def count_params(spec: ModelSpec) -> int:
    """Total trainable parameters of ``build(spec)`` (tied head counted once)."""
    return sum(r.count for r in breakdown(spec))


def count_params_non_embedding(spec: ModelSpec) -> int:
    """Parameters without the token embedding and the (untied) LM head."""
    return sum(r.count for r in breakdown(spec) if r.component not in ("embedding", "head"))


def state_size_bytes(spec: ModelSpec, seq_len: int, dtype_bytes: int = 2) -> int:
    """Bytes of decoding state per sequence after ``seq_len`` tokens (zoology's "state size"), at ``dtype_bytes``.

    Memory layers (lmm, and the memory of mac/mag/mal): the recurrent memory W (and momentum S) of every head.
    Attention: the KV cache ``2 * n * H * d_head`` with n = seq_len (attn), min(seq_len, window) (swa, mag, mal)
    or the attention window of one MAC segment (2C tokens: retrieved + segment). Persistent tokens are parameters,
    not state; conv and unfinished-chunk buffers are not counted.
    """
    from miras.components.memory import state_bytes

    H, dh = spec.n_heads, spec.d_head
    total = 0
    for kind in spec.blocks:
        if kind == "lmm" or (kind in ("mac", "mag", "mal") and spec.hybrid_memory == "lmm"):
            if spec.memory.local is not None:  # TNT: global + local memories and Pi (miras/components/tnt.py)
                from miras.components.tnt import tnt_state_bytes

                total += tnt_state_bytes(spec.memory, dh, H, dtype_bytes)
            else:
                from miras.components.feature_maps import feature_dim

                total += state_bytes(spec.memory, feature_dim(spec.memory.feature_map, dh), dh, H, dtype_bytes)
        memory_kind = kind if kind in ("trellis", "msssm") else spec.hybrid_memory if kind in ("mac", "mag", "mal") else ""
        if memory_kind == "trellis":  # K and V slots of every head
            from miras.components.trellis import trellis_state_numel

            total += trellis_state_numel(spec.trellis, n_heads=H, d_head=dh) * dtype_bytes
        elif memory_kind == "msssm":  # SSM states of every scale + the dilated-conv buffers of the decomposition
            from miras.components.msssm import msssm_state_numel

            total += msssm_state_numel(spec.msssm, d_model=spec.d_model) * dtype_bytes
        if kind == "attn":
            n = seq_len
        elif kind in ("swa", "mag", "mal"):
            n = min(seq_len, spec.attention.window)
        elif kind == "mac":
            n = 2 * min(seq_len, spec.mac.segment_length)
        else:
            n = 0
        total += 2 * n * H * dh * dtype_bytes
        if kind == "selfmod":  # the five (or four) self-modifying memories (hope)
            from miras.components.selfmod import selfmod_state_bytes

            total += selfmod_state_bytes(spec.memory, dh, H, dtype_bytes)
    if spec.mlp.kind == "cms":  # CMS levels that learn at test time carry weights + accumulated update (hope)
        from miras.components.cms import cms_state_bytes
        from miras.components.mlp import taper_widths

        for w in taper_widths(spec):
            total += cms_state_bytes(spec.mlp.cms, d_model=spec.d_model, width=w, dtype_bytes=dtype_bytes)
    from miras.components.caching import caching_state_bytes

    return total + caching_state_bytes(spec, seq_len, dtype_bytes)  # Memory Caching: caches grow with the segments


# ------------------------------------------------------------------------------------------------- budget solver

_KNOB_PATH = {"d_model": "d_model", "mlp_expansion": "mlp.expansion", "n_layers": "n_layers"}


def _count_at(spec: ModelSpec, knob: str, value: float | int) -> int | None:
    """count_params with the knob set to ``value`` (None when that spec is invalid)."""
    try:
        return count_params(spec.with_overrides({_KNOB_PATH[knob]: value}))
    except SpecError:
        return None


def _knob_values(spec: ModelSpec, knob: str):
    """The candidate knob values, increasing, and a function index -> value."""
    if knob == "d_model":
        step = spec.n_heads if spec.head_dim is None else 1
        return lambda i: step * i
    if knob == "n_layers":
        return lambda i: i
    return lambda i: i / spec.d_model  # mlp_expansion: d_ff = i exactly


def solve_budget(spec: ModelSpec) -> ModelSpec:
    """Set ``spec.budget.knob`` so that ``count_params`` lands closest to ``budget.params`` (within the tolerance).

    The count grows monotonically with each knob: d_model (multiples of n_heads unless head_dim is set, so heads stay
    whole), mlp_expansion (scanned through integer d_ff = expansion * d_model) or n_layers. Bisection finds the
    crossing; the closer neighbour wins.

    Raises:
        SpecError: without a budget, with mlp_expansion and mlp.kind none, or when no value lands within tolerance
            (the message gives the reachable range and the closest value).
    """
    b = spec.budget
    if b is None:
        raise SpecError("budget: solve_budget needs spec.budget (params, tolerance, knob), but got budget=None")
    knob = b.knob
    if knob == "mlp_expansion" and spec.mlp.kind == "none":
        raise SpecError("budget.knob: 'mlp_expansion' needs a channel MLP, but got mlp.kind='none'; use d_model or n_layers")
    value_of = _knob_values(spec, knob)
    lo = 1
    while _count_at(spec, knob, value_of(lo)) is None and lo < 4096:
        lo += 1
    c_lo = _count_at(spec, knob, value_of(lo))
    if c_lo is None:
        raise SpecError(f"budget.knob: no valid spec found while varying {knob}")
    hi, c_hi = lo, c_lo
    limit = 1 << 20
    while (c_hi is None or c_hi < b.params) and hi < limit:  # grow until the count passes the target
        hi *= 2
        c_hi = _count_at(spec, knob, value_of(hi))
    while hi - lo > 1:  # smallest index whose count >= target
        mid = (lo + hi) // 2
        c = _count_at(spec, knob, value_of(mid))
        if c is not None and c >= b.params:
            hi = mid
        else:
            lo = mid
    candidates = [(abs(c - b.params), i, c) for i in sorted({lo, hi}) if (c := _count_at(spec, knob, value_of(i))) is not None]
    err, best, count = min(candidates)
    if err > b.tolerance * b.params:
        near = " and ".join(f"{c} at {knob}={value_of(i):g}" for _, i, c in sorted(candidates, key=lambda t: t[1]))
        c_min = _count_at(spec, knob, value_of(1)) or c_lo
        raise SpecError(
            f"budget: params={b.params} (tolerance {b.tolerance:.0%}) is not reachable by varying {knob}, but got "
            f"closest count={count} at {knob}={value_of(best):g} (nearest settings: {near}; the smallest reachable "
            f"count is {c_min}). Change budget.params, budget.tolerance or budget.knob."
        )
    return spec.with_overrides({_KNOB_PATH[knob]: value_of(best)})
