"""MemoryMixer: the token mixer of a memory layer (Titans §4.4, Miras §5.3 block).

    q, k, v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))     depthwise causal conv, kernel conv_size
    q, k    = phi(l2norm(q)), phi(l2norm(k))                               phi: feature map (ATLAS §3.2)
    y, W_T  = memory_scan(q, k, v, gates(x), W_0)                          the memory update + read (miras.ops)
    o       = W_o (RMSNorm(y) * sigmoid(x W_g))                            output norm and gate (papers.md §1.2 [R])

Gates (all from :class:`Gate`): ``lr`` (Miras eta, Titans theta), ``keep`` (Miras alpha, = 1 - Titans alpha),
``momentum`` (Titans eta), ``huber_delta`` (Yaad delta). The initial memory state W_0 is learned (outer loop).

Decoding: the state carries the memory at the last chunk boundary plus the inputs of the unfinished chunk (and the
conv context), so that a token-by-token run reproduces the chunked full-sequence forward exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from miras.components.gates import Gate
from miras.errors import SpecError
from miras.spec import GateSpec, HuberBiasSpec, MemorySpec, OmegaBiasSpec, TrellisSpec


def mixer_gate_specs(spec: MemorySpec) -> dict[str, GateSpec]:
    """The gates a memory layer needs, keyed by the ``memory_scan`` gate name."""
    gates = {"lr": spec.learner.lr}
    if spec.retention.kind != "none":
        gates["keep"] = spec.retention.gate
    if spec.learner.kind in ("momentum", "muon"):
        gates["momentum"] = spec.learner.momentum
    if isinstance(spec.bias, HuberBiasSpec):
        gates["huber_delta"] = spec.bias.delta
    if isinstance(spec.bias, OmegaBiasSpec):  # ATLAS window gate gamma (+ the inner bias' own gates)
        gates["omega_gamma"] = spec.bias.gamma
        if isinstance(spec.bias.inner, HuberBiasSpec):
            gates["huber_delta"] = spec.bias.inner.delta
    return gates


def add_qkv_projections(module: nn.Module, *, d_model: int, inner: int, conv_size: int) -> None:
    """``w_q, w_k, w_v``: ``d_model -> inner`` projections (no bias), then ``conv_q, conv_k, conv_v``: depthwise causal
    short convolutions of kernel ``conv_size`` (None when 0) — the input side of every memory mixer (Titans §4.4)."""
    for name in "qkv":
        setattr(module, f"w_{name}", nn.Linear(d_model, inner, bias=False))
    for name in "qkv":
        conv = nn.Conv1d(inner, inner, conv_size, groups=inner, bias=False) if conv_size else None
        setattr(module, f"conv_{name}", conv)


def memory_params(spec: MemorySpec, d_key: int, d_value: int, n: int) -> nn.ParameterDict:
    """The memory's outer-loop parameters for n memories (heads): LN weight 1, LN bias 0, elastic-net threshold
    gamma > 0 stored as ``log_threshold`` = log(spec.retention.threshold)."""
    from miras.components.memory import memory_param_shapes

    params = nn.ParameterDict()
    for name, shape in memory_param_shapes(spec, d_key, d_value).items():
        if name == "norm_weight":
            params[name] = nn.Parameter(torch.ones(n, *shape))
        elif name == "threshold":
            params["log_threshold"] = nn.Parameter(torch.full((n, *shape), math.log(spec.retention.threshold)))
        else:
            params[name] = nn.Parameter(torch.zeros(n, *shape))
    return params


class GatedOutput:
    """The output of every memory token mixer (Titans §4.4, Miras §5.3): ``W_o(RMSNorm(o) * sigmoid(x W_g))``.

    A mixin for ``nn.Module`` mixers that define ``out_norm`` (or None), ``w_g`` (or None) and ``w_o``.
    """

    out_norm: nn.Module | None
    w_g: nn.Module | None
    w_o: nn.Module
    spec: MemorySpec | TrellisSpec

    def add_output(self, *, d_model: int, inner: int, d_head: int) -> None:
        """Create ``out_norm`` (RMSNorm per head, if ``spec.output_norm``), ``w_g`` (if ``spec.output_gate``), ``w_o``."""
        self.out_norm = nn.RMSNorm(d_head, eps=1e-6) if self.spec.output_norm else None
        self.w_g = nn.Linear(d_model, inner, bias=False) if self.spec.output_gate else None
        self.w_o = nn.Linear(inner, d_model, bias=False)

    @property
    def conv_context(self) -> int:
        """Tokens of left context the short conv (kernel ``spec.conv_size``) needs."""
        return max(self.spec.conv_size - 1, 0)

    def output(self, o: Tensor, x: Tensor) -> Tensor:
        """Memory outputs ``o [B, T, H, d]`` and mixer inputs ``x [B, T, D]`` -> ``[B, T, D]``."""
        B, T = o.shape[:2]
        o = o.to(x.dtype)
        if self.out_norm is not None:
            o = self.out_norm(o)
        o = o.reshape(B, T, -1)  # [B, T, H*d]
        if self.w_g is not None:
            o = o * torch.sigmoid(self.w_g(x))
        return self.w_o(o)  # [B, T, D]


class MemoryMixer(GatedOutput, nn.Module):
    """Projections -> short conv -> SiLU -> l2norm -> feature map -> memory_scan -> norm * gate -> W_o.

    Args:
        spec: the memory layer spec.
        d_model: model width; n_heads, d_head: memory heads (d_key = d_value = d_head).
    """

    def __init__(self, spec: MemorySpec, *, d_model: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        from miras.components.memory import state_shapes

        self.spec, self.n_heads, self.d_head = spec, n_heads, d_head
        from miras.components.feature_maps import MAX_FEATURE_DIM
        from miras.registry import FEATURE_MAP

        self.feature_map = FEATURE_MAP.get(spec.feature_map.kind)(spec.feature_map)
        self.d_key = self.feature_map.dim(d_head)  # the memory's key dim (ATLAS exponential map: 1 + d + d^2)
        if self.d_key > MAX_FEATURE_DIM:
            raise SpecError(
                f"memory.feature_map: the exponential map gives key dim 1 + d + d^2 = {self.d_key} for d_head={d_head}, "
                f"which must be <= {MAX_FEATURE_DIM}; use a smaller head_dim, degree 1, or kind: polynomial."
            )
        inner = n_heads * d_head
        add_qkv_projections(self, d_model=d_model, inner=inner, conv_size=spec.conv_size)
        fm = spec.feature_map
        if fm.kind == "polynomial":
            coef = torch.tensor([1.0 / math.factorial(i) for i in range(1, fm.degree + 1)])
            if fm.learnable:
                self.fm_coef = nn.Parameter(coef)
            else:
                self.register_buffer("fm_coef", coef)
        self.gates = nn.ModuleDict(
            {name: Gate(g, d_model=d_model, n_heads=n_heads, d_key=self.d_key, name=name)
             for name, g in mixer_gate_specs(spec).items()}
        )
        # learned initial memory state W_0 (per head); momentum buffers start at zero and are not parameters
        self.state_shapes = state_shapes(spec, self.d_key, d_head)
        self.init_state = nn.ParameterDict()
        for name, shape in self.state_shapes.items():
            if name.startswith("W"):
                self.init_state[name] = nn.Parameter(torch.randn(n_heads, *shape) / math.sqrt(shape[0]))
        self.mem_params = memory_params(spec, self.d_key, d_head, n_heads)
        self.add_output(d_model=d_model, inner=inner, d_head=d_head)
        # Memory Caching (the caching-policy axis): segment caches aggregated around the scan (components/caching.py)
        self.caching = None
        if spec.caching.kind != "none":
            from miras.components.caching import MemoryCaching

            self.caching = MemoryCaching(spec.caching, d_model=d_model)

    # ------------------------------------------------------------------------------------------------ pieces
    def initial_state(self) -> dict[str, Tensor]:
        """W_0 per head ``[H, in, out]`` (KL retention: ``scale * softmax(logits)``, positive rows summing to scale)."""
        state: dict[str, Tensor] = {}
        for name, shape in self.state_shapes.items():
            if name.startswith("W"):
                w = self.init_state[name]
                if self.spec.retention.kind == "kl":
                    w = self.spec.retention.scale * torch.softmax(w, dim=-1)
                state[name] = w
            elif name.startswith("S"):
                state[name] = self.init_state["W" + name[1:]].new_zeros(self.n_heads, *shape)
            else:  # omega window (keys, values, gates of the previous c - 1 tokens): empty (zero gamma) at the start
                state[name] = self.init_state["W1"].new_zeros(self.n_heads, *shape)
        return state

    def memory_params(self) -> dict[str, Tensor] | None:
        out = {k: v for k, v in self.mem_params.items() if k != "log_threshold"}
        if "log_threshold" in self.mem_params:
            out["threshold"] = self.mem_params["log_threshold"].exp()
        return out or None

    def _branch(self, x: Tensor, proj: nn.Linear, conv: nn.Conv1d | None) -> Tensor:
        B, T, _ = x.shape
        h = proj(x)  # [B, T, H*d]
        if conv is not None:
            h = conv(F.pad(h.transpose(1, 2), (self.conv_context, 0))).transpose(1, 2)  # causal: [B, T, H*d]
        if self.spec.qkv_activation == "silu":
            h = F.silu(h)
        return h.reshape(B, T, self.n_heads, self.d_head)  # [B, T, H, d]

    def _qk(self, h: Tensor) -> Tensor:
        if self.spec.qk_norm:
            h = F.normalize(h, dim=-1, eps=1e-6)
        # registered feature map (miras.components.feature_maps): identity, polynomial (coefficients fm_coef),
        # exponential (ATLAS Eq. 22-23: [B, T, H, d] -> [B, T, H, 1 + d + d^2])
        h = self.feature_map(h, getattr(self, "fm_coef", None))
        return h

    def queries(self, x: Tensor) -> Tensor:
        """q ``[B, T, H, d]`` for a context ``x [B, T, D]`` (conv zero-padded at its start)."""
        return self._qk(self._branch(x, self.w_q, self.conv_q))

    def features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """q, k ``[B, T, H, d]``, v ``[B, T, H, d]`` and the gates ``{name: [B, T, H] | [B, T, H, K]}``."""
        q = self.queries(x)
        k = self._qk(self._branch(x, self.w_k, self.conv_k))
        v = self._branch(x, self.w_v, self.conv_v)
        return q, k, v, {name: gate(x) for name, gate in self.gates.items()}

    def scan(self, q: Tensor, k: Tensor, v: Tensor, gates: dict[str, Tensor], state: dict[str, Tensor]):
        """``memory_scan`` with this layer's spec and outer-loop params: returns (o [B, T, H, d], final state)."""
        from miras.ops import memory_scan

        return memory_scan(self.spec, q, k, v, gates, state, params=self.memory_params())

    def read(self, q: Tensor, state: dict[str, Tensor]) -> Tensor:
        """``y = M*(q; W)`` with a fixed state, no update (Titans Eq. 15)."""
        from miras.ops import memory_read

        return memory_read(self.spec, q, state, params=self.memory_params())

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        """Mix ``x [B, T, D]``; ``state`` continues a sequence (None: a fresh one). Returns (y [B, T, D], state).

        The returned state is ``{"memory": state at the last chunk boundary, "ctx": inputs still needed,
        "n_pending": tokens of the unfinished chunk}``: chunks are aligned with the start of the sequence, so any
        split of a sequence into calls gives the same outputs as one call.
        """
        if self.caching is not None:
            return self.caching(self, x, state)
        b = self.spec.learner.chunk_size
        if state is None:
            mem, ctx, n_pending = self.initial_state(), x[:, :0], 0
        else:
            mem, ctx, n_pending = state["memory"], state["ctx"], state["n_pending"]
        xs = torch.cat([ctx, x], 1)  # [B, lead + n, D]
        lead = ctx.shape[1] - n_pending
        q, k, v, gates = self.features(xs)
        q, k, v = q[:, lead:], k[:, lead:], v[:, lead:]
        gates = {name: g[:, lead:] for name, g in gates.items()}
        n = xs.shape[1] - lead
        n_full = n // b * b
        if n_full in (0, n):
            o, final = self.scan(q, k, v, gates, mem)
            boundary = final if n_full == n else mem
        else:  # split at the last chunk boundary so the carried state is a boundary state
            head, tail = slice(0, n_full), slice(n_full, n)
            o1, boundary = self.scan(q[:, head], k[:, head], v[:, head], {g: t[:, head] for g, t in gates.items()}, mem)
            o2, _ = self.scan(q[:, tail], k[:, tail], v[:, tail], {g: t[:, tail] for g, t in gates.items()}, boundary)
            o = torch.cat([o1, o2], 1)
        y = self.output(o[:, n - x.shape[1] :], x)
        keep = min(n - n_full + self.conv_context, xs.shape[1])
        return y, {"memory": boundary, "ctx": xs[:, xs.shape[1] - keep :], "n_pending": n - n_full}
