"""Data-dependent gates of a memory layer: inner learning rate, retention keep, momentum decay, Huber threshold.

    g_t = lo + (hi - lo) * sigmoid(x_t W + b)            (full projection, GateSpec.rank = 0)
    g_t = lo + (hi - lo) * sigmoid(x_t W_down W_up + b)  (low-rank, RWKV-7 style; Miras §5.3)
    g_t = lo + (hi - lo) * sigmoid(b)                    (data_dependent: false, a learned constant)

The bias is set so that a zero input gives ``GateSpec.init`` (papers.md §1.3: Titans-style logit inits).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from miras.errors import SpecError
from miras.spec import GateSpec


def gate_outputs(spec: GateSpec, *, n_heads: int, d_key: int) -> int:
    """Number of gate values per token before broadcasting: 1 (scalar), H (head) or H*K (channel)."""
    return {"scalar": 1, "head": n_heads, "channel": n_heads * d_key}[spec.granularity]


def gate_param_count(spec: GateSpec, *, d_model: int, n_heads: int, d_key: int) -> int:
    """Parameters of :class:`Gate` (used by the analytic counter in miras/params.py)."""
    n = gate_outputs(spec, n_heads=n_heads, d_key=d_key)
    if not spec.data_dependent:
        return n
    if spec.rank == 0:
        return d_model * n + n
    return d_model * spec.rank + spec.rank * n + n


class Gate(nn.Module):
    """One gate from a :class:`GateSpec`; ``forward(x [B, T, D]) -> [B, T, H]`` (or ``[B, T, H, K]`` for channel)."""

    def __init__(self, spec: GateSpec, *, d_model: int, n_heads: int, d_key: int, name: str = "gate") -> None:
        super().__init__()
        self.spec, self.n_heads, self.d_key = spec, n_heads, d_key
        n = gate_outputs(spec, n_heads=n_heads, d_key=d_key)
        frac = (spec.init - spec.lo) / (spec.hi - spec.lo)
        if not 0.0 < frac < 1.0:  # GateSpec validates this; keep the check for hand-built specs
            raise SpecError(f"{name}.init: must lie strictly inside (lo, hi), but got init={spec.init}")
        self.bias = nn.Parameter(torch.full((n,), math.log(frac / (1.0 - frac))))
        self.down: nn.Linear | None = None
        self.proj: nn.Linear | None = None
        if spec.data_dependent:
            if spec.rank == 0:
                self.proj = nn.Linear(d_model, n, bias=False)
            else:
                self.down = nn.Linear(d_model, spec.rank, bias=False)
                self.proj = nn.Linear(spec.rank, n, bias=False)

    def logits(self, x: Tensor) -> Tensor:
        """Pre-sigmoid values ``[B, T, n]``."""
        if self.proj is None:
            return self.bias.expand(*x.shape[:-1], -1)
        h = self.down(x) if self.down is not None else x
        return self.proj(h) + self.bias

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        logits = self.logits(x)
        if logits.dtype in (torch.float16, torch.bfloat16):  # gates are computed in at least float32
            logits = logits.float()
        g = s.lo + (s.hi - s.lo) * torch.sigmoid(logits)  # [B, T, n]
        B, T = x.shape[:2]
        if s.granularity == "scalar":
            return g.expand(B, T, self.n_heads)  # [B, T, H]
        if s.granularity == "channel":
            return g.reshape(B, T, self.n_heads, self.d_key)  # [B, T, H, K]
        return g  # [B, T, H]
