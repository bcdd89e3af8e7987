r"""The Omega bias (ATLAS Eq. 9-10) on the kernels of its inner bias, by writing every token's window as sub-tokens.

With the gd learner, token t's update is the gamma-weighted window sum of the inner bias' gradients, all taken at
the chunk-start point of t's chunk (miras/ops_ext.py, the chunked dual form's semantics):

    A_t = alpha_t A_{t-1} - eta_t sum_{j=0..c-1} gamma_{t-j} grad l_inner(A_0; k_{t-j}, v_{t-j})     (ATLAS Eq. 9-10)

The gradient is linear in gamma, so the same update is c inner-bias steps with no retention between them: token t
becomes the c sub-tokens (k_{t-c+1..t}, v_{t-c+1..t}) with learning rates eta_t gamma_{t-c+1..t} and keep gates
(alpha_t, 1, ..., 1), read with q_t at the last sub-token (zeros elsewhere). A chunk of b tokens is a chunk of c*b
sub-tokens whose gradients are all taken at the same chunk-start point, so the inner kernels (chunk c*b <= 64)
compute the Omega rule exactly, at c times the work of the inner bias; its gradients reach k, v, gamma, the window
carried in from the previous call and the initial state through the gathers here (autograd).

Momentum does not factor this way (A_t adds S_t once per token, not once per sub-token): omega with the momentum
learner stays on the chunked path, as do muon and dgd. The lag-token retentions (kl, elastic) take their non-linear
step at each chunk's first token from that token's whole window: the first c sub-tokens of the sub-token chunk
(``lag_rows``, ``linear._lag_grad``).
"""

from __future__ import annotations

import torch

from miras.kernels import _channel_gate, _channel_keep, _gate
from miras.ops_common import required_gates

__all__ = ["omega_inner_spec", "omega_scan", "omega_support"]


def omega_inner_spec(spec):
    """The spec the inner kernels run: the omega bias' inner bias at chunk ``window * learner.chunk_size``."""
    c = spec.bias.window
    learner = spec.learner.model_copy(update={"chunk_size": c * spec.learner.chunk_size})
    return spec.model_copy(update={"bias": spec.bias.inner, "learner": learner})


def omega_support(spec, max_chunk: int) -> str:
    """Why an omega-bias spec cannot take the sub-token form, or "" when it can (the inner spec is checked apart)."""
    c, b = spec.bias.window, spec.learner.chunk_size
    if spec.learner.kind != "gd":
        return (f"no Triton kernel for bias.kind='omega' with learner.kind={spec.learner.kind!r} (only 'gd': the window "
                "runs as sub-tokens of one gd chunk); the chunked PyTorch path runs it")
    if c * b > max_chunk:
        return (f"no Triton kernel for bias.kind='omega' with bias.window * learner.chunk_size = {c} * {b} = {c * b} "
                f"(the window's sub-tokens make chunks of at most {max_chunk}); the chunked PyTorch path runs it")
    return ""


def _windows(x: torch.Tensor, carried: torch.Tensor | None, c: int) -> torch.Tensor:
    """``[B, T, c, H, D]``: for every token t the c entries t-c+1..t of x ``[B, T, H, D]``, oldest first, those
    before the call from ``carried`` ``[B, H, c-1, D]`` (zeros when None)."""
    B, T, H, D = x.shape
    if c == 1:
        return x[:, :, None]
    before = x.new_zeros(B, c - 1, H, D) if carried is None else carried.to(x.dtype).expand(B, H, c - 1, D).transpose(1, 2)
    ext = torch.cat([before, x], 1)  # [B, c-1+T, H, D]
    return torch.stack([ext[:, j : j + T] for j in range(c)], 2)


def _sub(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, c, ...]`` -> ``[B, T*c, ...]``: the sub-token sequence."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def omega_scan(spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: dict[str, torch.Tensor],
               state: dict[str, torch.Tensor] | None, params: dict[str, torch.Tensor] | None, scan):
    """The omega-bias memory scan through ``scan`` (``triton_memory_scan``) on the sub-token sequence.

    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``; gates as ``memory_scan`` (``omega_gamma`` [B, T, H]); state may carry
    the window (``window_k`` [B, H, c-1, K], ``window_v``, ``window_gamma`` [B, H, c-1, 1], ``window_delta``).
    Returns o ``[B, T, H, V]`` and the final state with the window of the call's last c - 1 tokens."""
    c = spec.bias.window
    B, T, H, _ = q.shape
    state = state or {}

    def gate(name: str) -> torch.Tensor:  # fp32 [B, T, H, 1], shape-checked and named by kernels._gate
        return _gate(gates, name, B, T, H)[..., None]

    def carried(name: str) -> torch.Tensor | None:
        return state.get(name) if c > 1 else None

    kw = _windows(k, carried("window_k"), c)
    vw = _windows(v, carried("window_v"), c)
    gammas = _windows(gate("omega_gamma"), carried("window_gamma"), c)[..., 0]  # [B, T, c, H] (gates in fp32)
    qs = torch.cat([q.new_zeros(B, T, c - 1, *q.shape[2:]), q[:, :, None]], 2)
    sub_gates = {"lr": _sub(gate("lr")[..., 0][:, :, None] * gammas)}
    if "keep" in required_gates(spec):  # alpha_t on the window's first sub-token, 1 on the others
        K = k.shape[-1]
        keep = _channel_keep(gates, B, T, H, K) if _channel_gate(spec) else gate("keep")
        keep = keep[:, :, None]
        sub_gates["keep"] = _sub(torch.cat([keep, keep.new_ones(B, T, c - 1, *keep.shape[3:])], 2))
    deltas = None
    if spec.bias.inner.kind == "huber":
        deltas = _windows(gate("huber_delta"), carried("window_delta"), c)[..., 0]
        sub_gates["huber_delta"] = _sub(deltas)
    inner_state = {n: s for n, s in state.items() if not n.startswith("window_")}
    # (a lag-token retention's step at each chunk's first token takes that token's whole window: c sub-tokens)
    o, final = scan(omega_inner_spec(spec), _sub(qs), _sub(kw), _sub(vw), sub_gates, inner_state or None,
                    params=params, lag_rows=c)
    o = o.view(B, T, c, *o.shape[2:])[:, :, -1]
    if c > 1:  # the last c - 1 tokens (the last token's window without its oldest entry), float32 as the states
        final["window_k"] = kw[:, -1, 1:].transpose(1, 2).float()
        final["window_v"] = vw[:, -1, 1:].transpose(1, 2).float()
        final["window_gamma"] = gammas[:, -1, 1:].transpose(1, 2)[..., None].float()
        if deltas is not None:
            final["window_delta"] = deltas[:, -1, 1:].transpose(1, 2)[..., None].float()
    return o, final
