"""Memory architectures: the network whose weights are the recurrent state (Titans §3.1, Miras §4 "memory architecture").

    linear      M(x; W) = x W                                         W: [K, V] per head (DeltaNet, GDN, linear attention)
    mlp         M(x; W) = x + LN(act(... act(x W_1) ...) W_L) * w + b   (Titans §3.1, Miras §5.3; residual/LN optional)

Row-vector convention (papers.md §0.2): ``z = x W`` with ``W: [in, out]``; the per-token gradient of a layer is the rank-one
``outer(a_{l-1}, dz_l)`` (deep-memory-dual-form.md). Tensors inside the ops use the layout ``[B, H, n, features]`` and weights
``[B, H, in, out]``; outer-loop parameters are given per head (``[H, V]``) and broadcast here.

Besides the forward, :class:`MLPMemory` has the hand-written pieces of the chunked form: a forward that keeps the
activations, the backward that turns output-gradient rows R into per-layer rank-one factors (a_{l-1}, d_l), and the
dual-form read with per-token weights as masked matrix products.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from miras.registry import MEMORY
from miras.spec import LinearMemorySpec, MemorySpec, MLPMemorySpec

LN_EPS = 1e-5

# ---------------------------------------------------------------------------------------------- activations


def gelu_grad(z: Tensor) -> Tensor:
    """d/dz [z Phi(z)] = Phi(z) + z phi(z) (exact erf GELU, torch's default), as torch's fused GELU backward with a unit
    upstream gradient (one op; differentiable)."""
    return torch.ops.aten.gelu_backward(z.new_ones(()).expand_as(z), z)


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _tanh_grad(z: Tensor) -> Tensor:
    return 1.0 - torch.tanh(z) ** 2


def _relu_grad(z: Tensor) -> Tensor:
    return (z > 0).to(z.dtype)


class _GeluWithGrad(torch.autograd.Function):
    """``(gelu(z), gelu'(z))`` from one erf and one exp, for the hand backward of the chunked form (which needs both at
    the gradient point). Backward: ``dz = dh gelu'(z) + dp gelu''(z)``, ``gelu''(z) = phi(z) (2 - z^2)``."""

    @staticmethod
    def forward(z: Tensor) -> tuple[Tensor, Tensor]:
        cdf = torch.erf(z * math.sqrt(0.5)).add_(1.0).mul_(0.5)  # Phi(z)
        pdf = torch.exp(z * z * -0.5).mul_(1.0 / math.sqrt(2.0 * math.pi))  # phi(z)
        h = z * cdf
        zpdf = z * pdf
        pdf.mul_(2.0 - z * z)  # now gelu''(z)
        return h, cdf.add_(zpdf), pdf

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: tuple[Tensor, Tensor, Tensor]) -> None:
        ctx.save_for_backward(output[1], output[2])
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh: Tensor | None, dp: Tensor | None, _: None) -> Tensor | None:
        p, gpp = ctx.saved_tensors
        dz = None if dh is None else dh * p
        if dp is not None:
            dz = dp * gpp if dz is None else dz.addcmul_(dp, gpp)
        return dz


def gelu_with_grad(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(gelu(z), gelu'(z))`` (exact erf GELU), differentiable once in both outputs."""
    h, p, _ = _GeluWithGrad.apply(z)
    return h, p


def _gelu_vjp(grad: Tensor, z: Tensor) -> Tensor:
    """``grad * gelu'(z)`` in one fused (twice differentiable) op."""
    return torch.ops.aten.gelu_backward(grad, z)


ACTIVATIONS = {
    "gelu": (torch.nn.functional.gelu, gelu_grad),
    "silu": (torch.nn.functional.silu, _silu_grad),
    "tanh": (torch.tanh, _tanh_grad),
    "relu": (torch.relu, _relu_grad),
}

# ------------------------------------------------------------------------------------------- shape helpers


def hidden_width(spec: MemorySpec, d_key: int) -> int:
    """Hidden width h of an MLP memory: ``max(1, round(expansion * d_key))``; 0 for a linear memory (no hidden layer)."""
    mem = spec.memory
    if isinstance(mem, LinearMemorySpec):
        return 0
    return max(1, int(round(mem.expansion * d_key)))


def layer_dims(spec: MemorySpec, d_key: int, d_value: int) -> list[tuple[int, int]]:
    """``(in, out)`` of every memory layer: ``[(K, V)]`` (linear, depth 1) or ``[(K, h), (h, h), ..., (h, V)]``."""
    mem = spec.memory
    depth = 1 if isinstance(mem, LinearMemorySpec) else mem.depth
    if depth == 1:
        return [(d_key, d_value)]
    h = hidden_width(spec, d_key)
    return [(d_key, h)] + [(h, h)] * (depth - 2) + [(h, d_value)]


def state_shapes(spec: MemorySpec, d_key: int, d_value: int) -> dict[str, tuple[int, ...]]:
    """Recurrent state per head (no B, H): ``W1..WL`` (layer weights; the accumulator A for lq), ``S1..SL`` (momentum,
    muon) and the omega window (:func:`window_state_shapes`)."""
    dims = layer_dims(spec, d_key, d_value)
    shapes = {f"W{i + 1}": d for i, d in enumerate(dims)}
    if spec.learner.kind in ("momentum", "muon"):
        shapes.update({f"S{i + 1}": d for i, d in enumerate(dims)})
    shapes.update(window_state_shapes(spec, d_key, d_value))
    return shapes


def window_state_shapes(spec: MemorySpec, d_key: int, d_value: int) -> dict[str, tuple[int, ...]]:
    """Omega bias (ATLAS Eq. 9): the last c - 1 keys, values, window gates gamma (and Huber deltas) carried across calls
    so that a continued sequence sees the same window (``window_k``, ``window_v``, ``window_gamma``, ``window_delta``)."""
    bias = spec.bias
    if bias.kind != "omega" or bias.window <= 1:
        return {}
    c = bias.window - 1
    shapes = {"window_k": (c, d_key), "window_v": (c, d_value), "window_gamma": (c, 1)}
    if bias.inner.kind == "huber":
        shapes["window_delta"] = (c, 1)
    return shapes


def memory_param_shapes(spec: MemorySpec, d_key: int, d_value: int) -> dict[str, tuple[int, ...]]:
    """Outer-loop parameters of the memory op per head (the caller stores them as ``[H, *shape]``).

    ``norm_weight``, ``norm_bias``: (V,) for an MLP memory with ``norm``; ``threshold``: () for elastic retention (gamma > 0).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    if isinstance(spec.memory, MLPMemorySpec) and spec.memory.norm:
        shapes["norm_weight"] = (d_value,)
        shapes["norm_bias"] = (d_value,)
    if spec.retention.kind == "elastic":
        shapes["threshold"] = ()
    return shapes


def state_bytes(spec: MemorySpec, d_key: int, d_value: int, n_heads: int, dtype_bytes: int = 4) -> int:
    """Bytes of the recurrent memory state of one sequence (all heads; W and S buffers)."""
    per_head = sum(math.prod(s) for s in state_shapes(spec, d_key, d_value).values())
    return per_head * n_heads * dtype_bytes


# ------------------------------------------------------------------------------------------------ the network


def masked_scores(h: Tensor, a: Tensor, G: Tensor) -> Tensor:
    """``S[t, j] = sum_r h[t, r] G[t, j, r] a[j, r]`` (``G ⊙ h a^T`` when R = 1).

    h, a ``[..., n, r]``; G ``[..., n, n, 1|r]``.
    """
    if G.shape[-1] == 1:
        return (h @ a.transpose(-1, -2)) * G.squeeze(-1)  # [..., n, n]
    return torch.einsum("...tk,...tjk,...jk->...tj", h, G, a)  # [..., n, n]


@MEMORY.register("mlp")
class MLPMemory:
    """``M(x) = [x +] [LN](act(... act(x W_1) ...) W_L)`` with hand-written backward and dual-form read.

    Args:
        spec: the memory layer spec (``spec.memory`` is read).
    Layouts: x ``[B, H, n, K]``; weights ``[B, H, in, out]`` (or anything broadcasting); row scales ``[B, H, n, 1|K]``.
    """

    supports_chunked: ClassVar[bool] = True

    def __init__(self, spec: MemorySpec) -> None:
        mem = spec.memory
        if isinstance(mem, LinearMemorySpec):
            self.depth, self.activation, self.residual, self.norm = 1, "gelu", False, False
        else:
            self.depth, self.activation, self.residual, self.norm = mem.depth, mem.activation, mem.residual, mem.norm
        self.act, self.act_grad = ACTIVATIONS[self.activation]

    # ---------------------------------------------------------------------------------------- output head
    def _norm_params(self, params: dict[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        w, b = params["norm_weight"], params["norm_bias"]  # [H, V]
        return w[None, :, None, :], b[None, :, None, :]  # [1, H, 1, V]

    def head(self, y_pre: Tensor, x: Tensor, params: dict[str, Tensor] | None) -> tuple[Tensor, tuple | None]:
        """LayerNorm (with affine) and residual on the last layer's output; returns (y, cache for the backward)."""
        w = self._norm_params(params)[0] if self.norm else None
        return self.head_folded(y_pre, self.head_offset(x, params), w)

    def head_offset(self, x: Tensor, params: dict[str, Tensor] | None) -> Tensor | None:
        """The head's weight-independent part ``[..., H, n, V]`` for inputs x ``[..., H, n, K]``: the residual input x
        plus the LN bias (either alone; None when there is neither)."""
        offset = x if self.residual else None
        if self.norm:
            b = self._norm_params(params)[1]  # [1, H, 1, V]
            offset = b.expand(*x.shape[:-1], b.shape[-1]) if offset is None else offset + b
        return offset

    def head_folded(
        self, y_pre: Tensor, offset: Tensor | None, w: Tensor | None, scale: Tensor | None = None
    ) -> tuple[Tensor, tuple | None]:
        """``offset + LN(y_pre) ⊙ scale`` (norm; scale defaults to the LN weight w) or ``offset + y_pre``: :meth:`head`
        with its weight-independent part (residual input, LN bias) precomputed in ``offset`` (None: 0). With
        ``offset = v - x - b`` and ``scale = -w`` this is ``v - y`` (the negated l2 rows) in one op.
        Returns (out, cache for :meth:`head_backward`); w, scale broadcast against y_pre (e.g. ``[B * H, 1, V]``)."""
        if not self.norm:
            return (y_pre if offset is None else offset + y_pre), None
        xhat, mean, rstd = torch.native_layer_norm(y_pre, y_pre.shape[-1:], None, None, LN_EPS)
        scale = w if scale is None else scale
        return (xhat * scale if offset is None else torch.addcmul(offset, xhat, scale)), (y_pre, mean, rstd, w)

    def head_backward(self, R: Tensor, cache: tuple | None) -> Tensor:
        """dL/dy_pre from dL/dy = R (the residual path does not depend on the weights): the LayerNorm backward
        ``rstd (g - mean(g) - xhat mean(g xhat))``, ``g = R w``, as torch's fused (differentiable) kernel."""
        if not self.norm:
            return R
        y_pre, mean, rstd, w = cache
        mask = [True, False, False]
        return torch.ops.aten.native_layer_norm_backward(R * w, y_pre, y_pre.shape[-1:], mean, rstd, None, None, mask)[0]

    def act_with_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(act(z), act'(z))``; for gelu from one shared erf / exp (:func:`gelu_with_grad`)."""
        if self.activation == "gelu":
            return gelu_with_grad(z)
        return self.act(z), self.act_grad(z)

    def act_backward(self, grad: Tensor, z: Tensor) -> Tensor:
        """``grad * act'(z)`` (one fused op for gelu)."""
        return _gelu_vjp(grad, z) if self.activation == "gelu" else grad * self.act_grad(z)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, weights: list[Tensor], params: dict[str, Tensor] | None = None) -> Tensor:
        """``y = M(x; W)`` with one set of weights per (batch, head)."""
        h = x
        for i, W in enumerate(weights):
            h = h @ W
            if i < self.depth - 1:
                h = self.act(h)
        return self.head(h, x, params)[0]

    def forward_cache(
        self, x: Tensor, weights: list[Tensor], params: dict[str, Tensor] | None, scale: Tensor | None = None
    ) -> tuple[Tensor, dict]:
        """Forward at the weights ``diag(scale_j) W_l`` (row scale per token: the decayed gradient point), keeping Z and A.

        ``scale``: ``[B, H, n, 1]`` (every layer) or ``[B, H, n, K]`` (channel keep; linear memory only).
        """
        acts, zs = [x], []
        h = x
        for i, W in enumerate(weights):
            z = (h if scale is None else h * scale) @ W  # [B, H, n, out]
            zs.append(z)
            if i < self.depth - 1:
                h = self.act(z)
                acts.append(h)
        y, head_cache = self.head(zs[-1], x, params)
        return y, {"acts": acts, "zs": zs, "head": head_cache, "scale": scale}

    def backward_rows(self, R: Tensor, cache: dict, weights: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per-token rank-one gradient factors: grad of layer l for token j is ``outer(acts[l][j], ds[l][j])``.

        Hand backprop of the forward in :meth:`forward_cache` (deep-memory-dual-form.md steps 2-4).
        """
        scale = cache["scale"]
        d = self.head_backward(R, cache["head"])  # [B, H, n, V]
        ds = [d]
        for i in range(self.depth - 1, 0, -1):
            da = d @ weights[i].transpose(-1, -2)  # [B, H, n, in_i]
            if scale is not None:
                da = da * scale
            d = self.act_backward(da, cache["zs"][i - 1])
            ds.append(d)
        return cache["acts"], ds[::-1]

    # -------------------------------------------------------------------------------------------- dual form
    def dual_read(
        self,
        x: Tensor,
        base: list[Tensor],
        beta: Tensor,
        G: Tensor,
        acts: list[Tensor],
        ds: list[Tensor],
        params: dict[str, Tensor] | None,
        *,
        S0: list[Tensor] | None = None,
        f: Tensor | None = None,
        inv_nu: list[Tensor] | None = None,
        first: tuple[Tensor, Tensor | None, Tensor] | None = None,
    ) -> Tensor:
        """Reads ``y_t = M(x_t; W_t)`` with ``W_{l,t} = beta_t W_l0 + f_t S_l0 - sum_j G[t,j] outer(a_{l-1,j}, d_{l,j})``.

            H_l = (h beta) W_l0 + (h f) S_l0 - (G ⊙ h A_{l-1}^T) D_l ;  h_l = act(H_l / nu_l)   (dual-form note)

        Args: x ``[B, H, n, K]``; beta, f ``[B, H, n, R]``; G ``[B, H, n, n, R]`` (R = 1, or K for channel keep, which
        only a depth-1 memory takes); inv_nu: per layer ``[B, H, n, 1]`` (lq retention); first: the first layer's
        state-independent factors ``(x beta, x f, G ⊙ x k^T)`` when precomputed for all chunks at once.
        """
        h = x
        for i in range(self.depth):
            if i == 0 and first is not None:
                hb, hf, scores = first
            else:
                hb, hf, scores = h * beta, None if S0 is None else h * f, masked_scores(h, acts[i], G)
            Hl = hb @ base[i] - scores @ ds[i]  # [B, H, n, out]
            if S0 is not None:
                Hl = Hl + hf @ S0[i]
            if inv_nu is not None:
                Hl = Hl * inv_nu[i]
            h = self.act(Hl) if i < self.depth - 1 else Hl
        return self.head(h, x, params)[0]


@MEMORY.register("linear")
class LinearMemory(MLPMemory):
    """Matrix memory ``M(x) = x W`` (a depth-1 MLP without activation, norm or residual)."""
