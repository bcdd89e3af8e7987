r"""``memory_scan``: the memory of a miras layer written and read over a sequence (the public functional op).

Per head, for tokens t = 1..T with chunk size b (``spec.learner.chunk_size``) and chunk-start state W_s:

    g_t = grad_W l(M(k_t; P_t), v_t),  P_t = W_s or diag(prod_{chunk, <=t} alpha) W_s      (Titans Eq. 16, Miras Eq. 28)
    gd:        A_t = alpha_t A_{t-1} - eta_t g_t
    momentum:  S_t = mu_t S_{t-1} - eta_t g_t ;  A_t = alpha_t A_{t-1} + S_t            (Titans Eq. 13-14)
    W_t = A_t (none, decay) | A_t / ||A_e||_q^(q-2), e = last full-chunk end <= t (lq, Moneta Eq. 24-25)
          | lag-token softmax / soft threshold at each chunk's first token (kl: Memora Eq. 27; elastic: Miras Eq. 22)
    o_t = M(q_t; W_t)                                                                   (read after the write)

Every call partitions its tokens into chunks [0, b), [b, 2b), ... from its own start: a call that continues a sequence
reproduces the one-call result when it starts at a chunk boundary (decoding: carry the boundary state and replay the
unfinished chunk, as ``MemoryMixer`` does). Outputs never depend on later tokens (prefix property).

Biases l: dot, l2, lp, huber (``miras.components.bias``); memories M: linear, MLP (``miras.components.memory``).
The ATLAS / Nested-Learning options (omega bias, muon and dgd learners) run in ``miras.ops_ext`` (same modes).
Modes: ``recurrent`` (token-by-token oracle, ``miras.ops_recurrent``), ``chunked`` (the dual form, ``miras.ops_chunked``),
``triton`` (fused kernels from ``miras.kernels``), ``auto`` (triton on CUDA for float32 / bf16 / fp16 inputs when a
kernel covers the spec, with a one-time warning naming the missing piece otherwise; chunked on CPU and for float64).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from miras.components.memory import hidden_width, memory_param_shapes, state_bytes, state_shapes
from miras.errors import KernelUnavailable
from miras.ops_chunked import chunked_memory_scan
from miras.ops_common import check_inputs, components, final_state, prepare
from miras.ops_recurrent import recurrent_memory_scan
from miras.spec import MemorySpec

MODES = ("auto", "recurrent", "chunked", "triton")


def _triton_memory_scan(*args, **kwargs):
    try:
        from miras.kernels import triton_memory_scan
    except ImportError as err:
        raise KernelUnavailable(
            f"memory_scan: mode='triton' needs miras.kernels.triton_memory_scan, but it could not be imported ({err}). "
            "Use mode='chunked' or 'auto'."
        ) from None
    return triton_memory_scan(*args, **kwargs)


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(
        f"memory_scan: no Triton kernel for this memory ({reason}); using the PyTorch chunked path, which is exact "
        "but slower on GPU. Pass mode='chunked' to silence this warning.",
        stacklevel=4,
    )


def resolve_mode(spec: MemorySpec, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The implementation ``mode="auto"`` picks: ``triton`` on CUDA (float32, bf16, fp16 inputs) when a kernel covers
    the spec, else ``chunked`` (always on CPU and for float64)."""
    if device != "cuda" or dtype == torch.float64:
        return "chunked"
    try:
        from miras.kernels import kernel_support, triton_status
    except ImportError:
        return "chunked"
    return "triton" if triton_status()[0] and kernel_support(spec)[0] else "chunked"


def _auto_mode(spec: MemorySpec, q: Tensor, v: Tensor) -> str:
    if q.device.type != "cuda" or q.dtype == torch.float64:
        return "chunked"
    return cuda_mode(spec, q, v)


def cuda_mode(spec: MemorySpec, q: Tensor, v: Tensor) -> str:
    """What auto mode runs for inputs q, v on a CUDA device (whatever device they are on): ``resolve_mode``'s
    choice, and the chunked path beyond the kernels' shape limits, with a one-time warning naming the reason."""
    mode = resolve_mode(spec, "cuda", q.dtype)
    if mode == "chunked":
        _warn_fallback(kernel_gap(spec))
    elif q.dim() == 4 and v.dim() == 4:  # (malformed shapes: check_inputs names them)
        from miras.kernels import shape_gap

        gap = shape_gap(spec, *q.shape, v.shape[-1])
        if gap:
            _warn_fallback(gap)
            return "chunked"
    return mode


def kernel_gap(spec: MemorySpec) -> str:
    """Why no Triton kernel runs this spec on CUDA: ``kernel_support``'s reason (triton's own status first)."""
    try:
        from miras.kernels import kernel_support
    except ImportError as err:
        return f"miras.kernels could not be imported: {err}"
    return kernel_support(spec)[1]


def _select(mode: str, spec: MemorySpec, q: Tensor, v: Tensor) -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
    """The implementation for ``mode``; ``auto`` as :func:`resolve_mode` decides, and the chunked path where the
    kernels' shape limits rule them out (``miras.kernels.shape_gap``), with the fallback warning."""
    impls = {"recurrent": recurrent_memory_scan, "chunked": chunked_memory_scan, "triton": _triton_memory_scan}
    if mode == "auto":
        mode = _auto_mode(spec, q, v)
    if mode not in impls:
        raise ValueError(f"memory_scan: mode must be one of {', '.join(MODES)}, but got mode={mode!r}.")
    return impls[mode]


def memory_scan(
    spec: MemorySpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: dict[str, Tensor],
    state: dict[str, Tensor] | None = None,
    *,
    params: dict[str, Tensor] | None = None,
    mode: str = "auto",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Write every (k_t, v_t) into the memory and read it with q_t after each write.

    Args:
        spec: the memory layer spec (memory, bias, retention, learner axes; ``learner.chunk_size``).
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        gates: already squashed by the caller: ``"lr"`` eta ``[B, T, H]``; ``"keep"`` alpha ``[B, T, H]`` (or
            ``[B, T, H, K]`` for decay on a linear memory; absent for retention none); ``"momentum"`` mu ``[B, T, H]``
            (momentum, muon learners); ``"huber_delta"`` delta ``[B, T, H]`` (huber bias, or omega around huber);
            ``"omega_gamma"`` gamma ``[B, T, H]`` (omega bias window gates; ``miras.ops_ext``).
        state: ``{"W1".."WL", "S1".."SL"}`` with ``W_l: [B, H, in_l, out_l]`` or ``[H, in_l, out_l]`` (broadcast over
            B); None for zeros. For lq retention W holds the accumulator A; for kl it must be positive.
        params: ``"norm_weight"``, ``"norm_bias"`` ``[H, V]`` (MLP memory with norm); ``"threshold"`` ``[H]`` (elastic).
        mode: ``auto`` | ``recurrent`` | ``chunked`` | ``triton``.
    Returns:
        o ``[B, T, H, V]`` and the final state (same keys, always with the batch dim).
    Raises:
        ValueError: malformed shapes, missing or unexpected gates/state keys/params, unknown mode.
        KernelUnavailable: ``mode="triton"`` without the fused kernels.
    """
    impl = _select(mode, spec, q, v)
    check_inputs(spec, q, k, v, gates, state, params)
    out_dtype = q.dtype
    if impl is not _triton_memory_scan:  # the PyTorch paths compute in one dtype: fp64 if any input is, else fp32
        q, k, v, gates, state, params = _to_compute_dtype(q, k, v, gates, state, params)
    if q.shape[1] == 0:  # nothing to write: the (batched) initial state passes through
        p = prepare(spec, q, k, v, gates, state, params)
        return v.new_zeros(v.shape).to(out_dtype), {**final_state(p.W, p.S), **_window_passthrough(spec, q, v, state)}
    o, final = impl(spec, q, k, v, gates, state, params=params)
    return o.to(out_dtype), final


def _window_passthrough(spec: MemorySpec, q: Tensor, v: Tensor, state: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """The omega bias' carried window (``window_*`` state entries) of an empty call: unchanged, with the batch dim."""
    from miras.components.memory import window_state_shapes

    B, H = q.shape[0], q.shape[2]
    out = {}
    for name, shp in window_state_shapes(spec, q.shape[-1], v.shape[-1]).items():
        s = None if state is None else state[name].to(q.dtype)
        out[name] = q.new_zeros(B, H, *shp) if s is None else s.expand(B, H, *shp)
    return out


def _to_compute_dtype(q, k, v, gates, state, params):
    """Cast every input to float64 if any is float64, else float32 (bf16/fp16 inputs, e.g. under autocast, are
    upcast: the memory state accumulates over the whole sequence and must not be kept in 16 bits)."""
    tensors = [q, k, v, *gates.values(), *(state or {}).values(), *(params or {}).values()]
    dt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32

    def cast(d):
        return None if d is None else {n: t.to(dt) for n, t in d.items()}

    return q.to(dt), k.to(dt), v.to(dt), cast(gates), cast(state), cast(params)


def memory_read(spec: MemorySpec, q: Tensor, state: dict[str, Tensor], *, params: dict[str, Tensor] | None = None) -> Tensor:
    """``y = M*(q; W)``: read a fixed state without updating it (Titans Eq. 15; MAC's retrieval, Eq. 21).

    Args: q ``[B, T, H, K]``; state as returned by :func:`memory_scan` (``W_l``: ``[B, H, in, out]`` or ``[H, in, out]``;
    for lq the read weights are ``A / nu(A)``). Returns ``[B, T, H, V]``.
    """
    if not isinstance(state, dict) or "W1" not in state:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"memory_read: state must be a dict with keys W1..WL, but got state={got}.")
    comp = components(spec)
    n_layers = sum(1 for key in state if key.startswith("W"))
    W = [state[f"W{i + 1}"] for i in range(n_layers)]
    W = [w[None] if w.dim() == 3 else w for w in W]  # [B|1, H, in, out]
    W = comp.retention.effective(W)
    y = comp.memory.forward(q.transpose(1, 2), [w.to(q.dtype) for w in W], params)  # [B, H, T, V]
    return y.transpose(1, 2)


__all__ = [
    "MODES",
    "chunked_memory_scan",
    "hidden_width",
    "memory_param_shapes",
    "memory_read",
    "memory_scan",
    "prepare",
    "recurrent_memory_scan",
    "state_bytes",
    "state_shapes",
]
