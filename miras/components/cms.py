r"""Continuum Memory System (CMS): a channel mixer whose MLP levels learn at test time, each at its own frequency.

Nested Learning §7.1 (Behrouz, Razaviyayn, Zhong, Mirrokni 2025, arXiv:2512.24695), Eq. 70-71 and 74:

    chain        h_0 = x ;  h_l = h_{l-1} + MLP_l(h_{l-1}; theta_l) ;  y = h_k - x              (Eq. 70, residual levels)
    independent  y = sum_l w_l MLP_l(x; theta_l)   (w_l learned, init 1/k)                      (Eq. 74, "head-wise")
    update       theta_l <- theta_l - sum_{t in period} eta_t grad_theta l(theta_l; h_{l-1,t})    every C(l) tokens (Eq. 71)

Within a period of level l its weights are frozen (every f(theta_t; x_t) of Eq. 71 is taken at the period-start
weights) and the per-token error signal is accumulated; at the period end the accumulated update is applied. The sum
runs over the C(l) tokens of the period (the printed sum has C + 1 terms, an off-by-one: papers.md §4.4). A period of
null/0 never updates: one level with period null is exactly the plain MLP of the same block kind.

Inner objective (a choice the paper leaves open for causal use; ``cms.objective``). The paper's error signal is the
gradient of the *task* loss (next-token prediction) w.r.t. the block, which needs the full model's backward inside
the forward pass. We take the common local reading: each level is an associative memory trained on its own input,

    reconstruction   l(theta; h) = 1/2 ||MLP(h; theta) - h||^2             (auto-associative, no extra parameters)
    projection       l(theta; h) = 1/2 ||MLP(h; theta) - h W_T||^2         (W_T: d x d, learned in the outer loop)

Trust region (``cms.max_update`` tau, default 0.1) [R]: the inner loss is cubic in a SwiGLU's weights, so a plain
Eq. 71 step diverges as soon as the weights or inputs grow (measured: d = 64, weights of std 0.3, any eta >= 0.01 ->
NaN within 512 tokens); each weight matrix's accumulated update is rescaled to ``||e||_F <= tau ||theta||_F`` at the
boundary (null: the unclipped Eq. 71).

The initial weights theta_{l,0} and the lr gate are outer-loop parameters: gradients flow through every inner update
(the initial states are meta-learned, Eq. 73). Chunk-parallel form: a period is one batched forward plus a
hand-written backward summed over its tokens (``mode="chunked"``); ``mode="recurrent"`` is the token-by-token oracle
that gets its gradients from autograd.

Decoding: the state holds the current weights, the update accumulated since the last period boundary and the number of
tokens seen, so any split of a sequence into calls gives the one-call result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from miras.components.gates import Gate, gate_param_count
from miras.components.memory import ACTIVATIONS
from miras.model import Layer
from miras.spec import CMSSpec, ModelSpec

CMS_MODES = ("chunked", "recurrent")

# --------------------------------------------------------------------------------------------- sizes and counts


def level_widths(cms: CMSSpec, width: int) -> list[int]:
    """Hidden width of every level: ``max(1, round(widths[l] * width))`` (width: the layer's channel-MLP width)."""
    mult = cms.widths if cms.widths is not None else [1.0] * len(cms.periods)
    return [max(1, int(round(m * width))) for m in mult]


def level_shapes(block: str, d_model: int, width: int) -> dict[str, tuple[int, int]]:
    """Weight shapes of one level (row convention ``z = x W``): swiglu W1, W3 ``[D, w]``, W2 ``[w, D]``; gelu W1, W2."""
    shapes = {"W1": (d_model, width), "W2": (width, d_model)}
    if block == "swiglu":
        shapes["W3"] = (d_model, width)
    return shapes


def _updates(period: int | None) -> bool:
    return period is not None and period > 0


def cms_param_count(cms: CMSSpec, *, d_model: int, width: int) -> int:
    """Parameters of :class:`CMS` (mirrored by ``miras.params``): level weights, lr gates, W_T, aggregation weights."""
    n = 0
    for w in level_widths(cms, width):
        n += sum(math.prod(s) for s in level_shapes(cms.block, d_model, w).values())
        n += gate_param_count(cms.lr, d_model=d_model, n_heads=1, d_key=1)
        if cms.objective == "projection":
            n += d_model * d_model
    if cms.variant == "independent":
        n += len(cms.periods)
    return n


def cms_state_bytes(cms: CMSSpec, *, d_model: int, width: int, dtype_bytes: int = 2) -> int:
    """Decoding state of one sequence: the current weights and the accumulated update of every updating level."""
    n = 0
    for period, w in zip(cms.periods, level_widths(cms, width)):
        if _updates(period):
            n += 2 * sum(math.prod(s) for s in level_shapes(cms.block, d_model, w).values())
    return n * dtype_bytes


# --------------------------------------------------------------------------------------------- one level


def level_forward(block: str, x: Tensor, W: dict[str, Tensor]) -> Tensor:
    """``MLP(x; W)`` with per-sequence weights: x ``[B, n, D]``, W ``[B|1, in, out]``."""
    if block == "swiglu":
        return (F.silu(x @ W["W1"]) * (x @ W["W3"])) @ W["W2"]
    return F.gelu(x @ W["W1"]) @ W["W2"]


def level_grad(block: str, x: Tensor, W: dict[str, Tensor], target: Tensor, lr: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Output and ``sum_t lr_t grad_W 1/2 ||MLP(x_t; W) - target_t||^2`` for a period, by hand backprop.

    x, target ``[B, n, D]``; lr ``[B, n]``. Returns (y ``[B, n, D]``, {name: ``[B, in, out]``}).
    """
    if block == "swiglu":
        u, g = x @ W["W1"], x @ W["W3"]  # [B, n, w]
        a = F.silu(u)
        m = a * g
        y = m @ W["W2"]
        r = (y - target) * lr[..., None]  # [B, n, D]
        dm = r @ W["W2"].transpose(-1, -2)  # [B, n, w]
        du = dm * g * ACTIVATIONS["silu"][1](u)
        xt = x.transpose(-1, -2)
        return y, {"W1": xt @ du, "W3": xt @ (dm * a), "W2": m.transpose(-1, -2) @ r}
    u = x @ W["W1"]
    a = F.gelu(u)
    y = a @ W["W2"]
    r = (y - target) * lr[..., None]
    du = (r @ W["W2"].transpose(-1, -2)) * ACTIVATIONS["gelu"][1](u)
    return y, {"W1": x.transpose(-1, -2) @ du, "W2": a.transpose(-1, -2) @ r}


def apply_update(W: dict[str, Tensor], acc: dict[str, Tensor], max_update: float | None) -> dict[str, Tensor]:
    """``theta - e`` at a period boundary (Eq. 71); with ``max_update`` tau the update of each weight matrix is first
    rescaled to ``||e||_F <= tau ||theta||_F`` per sequence (a trust region [R], see :class:`~miras.spec.CMSSpec`)."""
    if max_update is None:
        return {k: W[k] - acc[k] for k in W}
    out = {}
    for k in W:
        w_norm = torch.linalg.vector_norm(W[k], dim=(-2, -1), keepdim=True)
        a_norm = torch.linalg.vector_norm(acc[k], dim=(-2, -1), keepdim=True)
        scale = torch.clamp(max_update * w_norm / (a_norm + 1e-12), max=1.0)
        out[k] = W[k] - acc[k] * scale
    return out


def level_scan(
    block: str,
    x: Tensor,
    target: Tensor,
    lr: Tensor,
    period: int | None,
    state: dict,
    *,
    mode: str = "chunked",
    max_update: float | None = None,
) -> tuple[Tensor, dict]:
    """Run one CMS level over ``x [B, T, D]`` (NL Eq. 71) from ``state = {"W": {...}, "acc": {...}, "pos": int}``.

    ``target`` ``[B, T, D]`` is the inner objective's target, ``lr`` ``[B, T]`` eta_t. ``W``/``acc`` entries are
    ``[B|1, in, out]`` (``acc`` may be None: zero). ``max_update``: see :func:`apply_update`.
    Returns (y ``[B, T, D]``, new state).
    """
    if mode not in CMS_MODES:
        raise ValueError(f"cms: mode must be one of {', '.join(CMS_MODES)}, but got mode={mode!r}.")
    W, acc, pos = dict(state["W"]), state.get("acc"), state["pos"]
    B, T, _ = x.shape
    if not _updates(period):
        return level_forward(block, x, W), {"W": W, "acc": acc, "pos": pos + T}
    acc = dict(acc) if acc is not None else {k: torch.zeros_like(w) for k, w in W.items()}
    if mode == "recurrent":
        return _level_recurrent(block, x, target, lr, period, W, acc, pos, max_update)
    outs, s = [], 0
    while s < T:
        e = min(T, s + period - (pos + s) % period)  # the end of the current period (or of the input)
        y, g = level_grad(block, x[:, s:e], W, target[:, s:e], lr[:, s:e])
        outs.append(y)
        acc = {k: acc[k] + g[k] for k in W}
        if (pos + e) % period == 0:  # period boundary: apply the accumulated update (Eq. 71)
            W = apply_update(W, acc, max_update)
            acc = {k: torch.zeros_like(a) for k, a in acc.items()}
        s = e
    return torch.cat(outs, 1), {"W": W, "acc": acc, "pos": pos + T}


def _level_recurrent(block, x, target, lr, period, W, acc, pos, max_update):
    """Token-by-token oracle of :func:`level_scan`: gradients from autograd (``torch.func.vjp``), one token at a time."""
    names = list(W)
    B = x.shape[0]
    W = {k: w.expand(B, *w.shape[1:]) for k, w in W.items()}  # per-sequence weights: vjp must not sum over the batch
    outs = []
    for t in range(x.shape[1]):
        xt, tt = x[:, t : t + 1], target[:, t : t + 1]

        def fwd(*ws: Tensor, xt: Tensor = xt) -> Tensor:
            return level_forward(block, xt, dict(zip(names, ws)))

        y, vjp_fn = torch.func.vjp(fwd, *[W[k] for k in names])
        grads = vjp_fn((y - tt) * lr[:, t : t + 1, None])  # d/dW of lr_t * 1/2 ||y - target||^2
        outs.append(y)
        acc = {k: acc[k] + g for k, g in zip(names, grads)}
        if (pos + t + 1) % period == 0:
            W = apply_update(W, acc, max_update)
            acc = {k: torch.zeros_like(a) for k, a in acc.items()}
    return torch.cat(outs, 1), {"W": W, "acc": acc, "pos": pos + x.shape[1]}


# --------------------------------------------------------------------------------------------- the module


class CMS(nn.Module):
    """The CMS channel mixer: ``forward(x [B, T, D], state=None, mode="chunked") -> (y [B, T, D], state)``.

    Args:
        spec: the CMS options (``mlp.cms``); d_model; width: the layer's channel-MLP width (after the taper).
    """

    def __init__(self, spec: CMSSpec, *, d_model: int, width: int) -> None:
        super().__init__()
        self.spec, self.d_model = spec, d_model
        self.widths = level_widths(spec, width)
        self.levels = nn.ModuleList()
        for w in self.widths:
            level = nn.Module()
            for name, (i, o) in level_shapes(spec.block, d_model, w).items():
                setattr(level, name, nn.Parameter(torch.randn(i, o) * 0.02))
            level.lr = Gate(spec.lr, d_model=d_model, n_heads=1, d_key=1, name="mlp.cms.lr")
            level.target = nn.Linear(d_model, d_model, bias=False) if spec.objective == "projection" else None
            self.levels.append(level)
        k = len(self.widths)
        self.agg = nn.Parameter(torch.full((k,), 1.0 / k)) if spec.variant == "independent" else None
        self.mode = "chunked"

    def _weights(self, level: nn.Module) -> dict[str, Tensor]:
        return {name: getattr(level, name)[None] for name in level_shapes(self.spec.block, 1, 1)}  # [1, in, out]

    def initial_state(self) -> list[dict]:
        return [{"W": self._weights(level), "acc": None, "pos": 0} for level in self.levels]

    def _run_level(self, i: int, h: Tensor, state: dict, mode: str) -> tuple[Tensor, dict]:
        level, period = self.levels[i], self.spec.periods[i]
        state = {**state, "W": {k: w.to(h.dtype) for k, w in state["W"].items()}}
        if not _updates(period):
            return level_scan(self.spec.block, h, h, h[..., 0], period, state, mode=mode)
        target = level.target(h) if level.target is not None else h
        lr = level.lr(h)[..., 0]  # [B, T]
        return level_scan(
            self.spec.block, h, target, lr.to(h.dtype), period, state, mode=mode, max_update=self.spec.max_update
        )

    def forward(self, x: Tensor, state: list[dict] | None = None, mode: str | None = None) -> tuple[Tensor, list[dict]]:
        mode = mode or self.mode
        states = state if state is not None else self.initial_state()
        new_states = []
        if self.spec.variant == "chain":
            h = x
            for i in range(len(self.levels)):
                y, s = self._run_level(i, h, states[i], mode)
                h = h + y
                new_states.append(s)
            return h - x, new_states
        out = 0.0
        for i in range(len(self.levels)):
            y, s = self._run_level(i, x, states[i], mode)
            out = out + self.agg[i] * y
            new_states.append(s)
        return out, new_states


class CMSLayer(Layer):
    """A residual layer whose channel mixer is a :class:`CMS`: ``x + block(norm1(x))`` then ``x + cms(norm2(x))``.

    The layer state is ``{"block": token-mixer state, "cms": CMS state}`` (the CMS weights evolve over the sequence).
    """

    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        y, s_block = self.block(self.norm1(x), None if state is None else state["block"])
        x = x + y
        m, s_cms = self.mlp(self.norm2(x), None if state is None else state["cms"])
        return x + m, {"block": s_block, "cms": s_cms}


def build_cms(spec: ModelSpec, width: int) -> CMS:
    """The CMS channel mixer of one layer (``mlp.kind: cms``) for a channel width ``width``."""
    return CMS(spec.mlp.cms, d_model=spec.d_model, width=width)


__all__ = [
    "CMS",
    "CMSLayer",
    "build_cms",
    "cms_param_count",
    "cms_state_bytes",
    "apply_update",
    "level_forward",
    "level_grad",
    "level_scan",
    "level_shapes",
    "level_widths",
]
