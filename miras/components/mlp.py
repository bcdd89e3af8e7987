"""Channel mixers (SwiGLU, GELU MLP) and the depth taper of their widths (Tapered LMs, arXiv 2606.23670).

    swiglu   y = W_2 (SiLU(x W_1) * (x W_3))       3 matrices, hidden = width (Llama)
    gelu     y = W_2 GELU(x W_1)                   2 matrices (GPT)

Taper (papers.md §7, §12.8), l = 0..L-1 with base width d_ff = round(expansion * d_model):
    uniform  d_l = d_ff
    linear   d_l = d_ff * (start + (end - start) * l / (L - 1))
    cosine   d_l = d_ff * (end + (start - end) * (1 + cos(pi l / (L - 1))) / 2)
    reverse  the cosine widths in reverse order (narrow to wide)
start + end = 2 makes the mean width d_ff before rounding; :func:`tapered_widths` keeps ``sum == L * d_ff`` exactly after
rounding (see there).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from miras.errors import SpecError
from miras.spec import ModelSpec


def base_width(spec: ModelSpec) -> int:
    """d_ff = round(expansion * d_model) (0 for ``mlp.kind: none``)."""
    return 0 if spec.mlp.kind == "none" else int(round(spec.mlp.expansion * spec.d_model))


def tapered_widths(d_ff: int, n_layers: int, kind: str, start: float = 1.5, end: float = 0.5, multiple: int = 8) -> list[int]:
    """Per-layer widths, multiples of ``multiple`` except one layer, with ``sum(widths) == n_layers * d_ff`` exactly.

    The real-valued schedule is rounded by largest remainders (units of ``multiple`` given to the layers with the
    largest fractional parts, ties to the earlier layer), which keeps a monotone schedule monotone and the total
    within one ``multiple`` of the budget. The remainder ``n_layers * d_ff mod multiple`` is added to the middle layer
    ``L // 2`` (or, if that would break monotonicity because the middle layer ties with its wider neighbour, to the
    first layer of that run of equal widths).

    Raises:
        SpecError: when a layer would get a width <= 0.
    """
    L = n_layers
    if kind == "uniform" or L == 1:
        widths = [d_ff] * L
    else:
        if kind == "linear":
            raw = [d_ff * (start + (end - start) * l / (L - 1)) for l in range(L)]
        elif kind in ("cosine", "reverse"):
            raw = [d_ff * (end + (start - end) * (1 + math.cos(math.pi * l / (L - 1))) / 2) for l in range(L)]
        else:
            raise SpecError(f"taper.kind: must be one of uniform, linear, cosine, reverse, but got kind={kind!r}")
        total = L * d_ff
        units, rem = divmod(total, multiple)
        scaled = [r * units * multiple / total / multiple for r in raw]  # real-valued units, summing to `units`
        base = [math.floor(s) for s in scaled]
        order = sorted(range(L), key=lambda i: (-(scaled[i] - base[i]), i))
        for i in order[: units - sum(base)]:
            base[i] += 1
        widths = [u * multiple for u in base]
        if rem:
            i = L // 2
            decreasing = widths[0] >= widths[-1]
            nb = i - 1 if decreasing else i + 1  # the wider neighbour
            while 0 <= nb < L and widths[nb] == widths[i]:
                i, nb = nb, (nb - 1 if decreasing else nb + 1)
            widths[i] += rem
        if kind == "reverse":
            widths = widths[::-1]
    for l, w in enumerate(widths):
        if w <= 0:
            raise SpecError(
                f"taper: the channel-MLP width of layer {l} must be > 0, but got width={w} "
                f"(d_ff={d_ff}, n_layers={L}, kind={kind!r}, start={start}, end={end}, multiple={multiple}). "
                f"Use a smaller taper.multiple, a larger mlp.expansion or a milder taper."
            )
    return widths


def taper_widths(spec: ModelSpec) -> list[int]:
    """Channel-MLP width of every layer of ``spec`` (all 0 for ``mlp.kind: none``)."""
    if spec.mlp.kind == "none":
        return [0] * spec.n_layers
    t = spec.taper
    return tapered_widths(base_width(spec), spec.n_layers, t.kind, t.start, t.end, t.multiple)


def mlp_param_count(kind: str, *, d_model: int, width: int) -> int:
    """3 d w (swiglu), 2 d w (gelu), 0 (none); no biases."""
    return {"swiglu": 3, "gelu": 2, "none": 0}[kind] * d_model * width


class SwiGLU(nn.Module):
    """``W_2 (SiLU(x W_1) * (x W_3))`` (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, *, d_model: int, width: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, width, bias=False)
        self.w3 = nn.Linear(d_model, width, bias=False)
        self.w2 = nn.Linear(width, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """``W_2 GELU(x W_1)``."""

    def __init__(self, *, d_model: int, width: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, width, bias=False)
        self.w2 = nn.Linear(width, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.gelu(self.w1(x)))


def build_mlp(kind: str, *, d_model: int, width: int) -> nn.Module | None:
    """The channel mixer of one layer (None for ``none``)."""
    if kind == "none":
        return None
    return {"swiglu": SwiGLU, "gelu": GeluMLP}[kind](d_model=d_model, width=width)
