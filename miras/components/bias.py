"""Attentional biases: the inner objective l(M(k), v) the memory minimises at test time (Miras §4-5.1).

Each bias gives its output-gradient rows ``R = dl/dy`` (one row-wise map per bias; the chunked form and the oracle both
backpropagate R through the memory) and a scalar ``loss`` whose autograd gradient w.r.t. y equals R where one exists
in closed form (tests check that).

    dot    l = -<y, v>                                  R = -v                           (Miras Eq. 8)
    l2     l = 1/2 ||y - v||^2                          R = r = y - v                    (Miras Eq. 9)
    lp     l = ||y - v||_p^p, smoothed (Remark 5)       R = p tanh(a r) (r^2 + eps)^((p-1)/2)   (Miras Eq. 10-11)
    huber  token-level switch (Yaad, Miras Eq. 16)      R = r if ||r||_2 <= delta_t else delta_t tanh(a r)
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from miras.registry import BIAS


class Bias:
    """Base: ``grad(y, v, delta) -> R`` with y, v ``[..., V]`` and delta ``[..., 1]`` (Huber only)."""

    gates: ClassVar[tuple[str, ...]] = ()
    exact_loss: ClassVar[bool] = True

    def __init__(self, spec) -> None:
        self.spec = spec

    def grad(self, y: Tensor, v: Tensor, delta: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def loss(self, y: Tensor, v: Tensor, delta: Tensor | None = None) -> Tensor:
        """Per-token loss ``[...]`` (summed over V)."""
        raise NotImplementedError

    def neg_grad(self, y: Tensor, v: Tensor, delta: Tensor | None = None) -> Tensor:
        """``-R`` (the chunked form accumulates negated rows; one op fewer where the negation folds in)."""
        return -self.grad(y, v, delta)


@BIAS.register("dot")
class DotBias(Bias):
    """``l = -<M(k), v>``: Hebbian write (linear attention with a linear memory)."""

    def grad(self, y, v, delta=None):
        return -v.expand_as(y)

    def neg_grad(self, y, v, delta=None):
        return v.expand_as(y)

    def loss(self, y, v, delta=None):
        return -(y * v).sum(-1)


@BIAS.register("l2")
class L2Bias(Bias):
    """``l = 1/2 ||M(k) - v||^2``: the delta rule."""

    def grad(self, y, v, delta=None):
        return y - v

    def neg_grad(self, y, v, delta=None):
        return v - y

    def loss(self, y, v, delta=None):
        return 0.5 * ((y - v) ** 2).sum(-1)


@BIAS.register("lp")
class LpBias(Bias):
    """``l = ||M(k) - v||_p^p`` with sign(r) ~ tanh(a r) and |r| ~ sqrt(r^2 + eps) in the gradient (Miras Remark 5).

    The smoothed gradient has no closed-form antiderivative: ``loss`` is ``sum (r^2 + eps)^(p/2)`` (for monitoring; its
    gradient differs from R by the tanh smoothing of the sign).
    """

    exact_loss: ClassVar[bool] = False

    def grad(self, y, v, delta=None):
        r = y - v
        s = self.spec
        return s.p * torch.tanh(s.smoothing * r) * (r * r + s.eps) ** ((s.p - 1.0) / 2.0)

    def loss(self, y, v, delta=None):
        r = y - v
        return ((r * r + self.spec.eps) ** (self.spec.p / 2.0)).sum(-1)


def _log_cosh(x: Tensor) -> Tensor:
    return torch.logaddexp(x, -x) - math.log(2.0)


@BIAS.register("huber")
class HuberBias(Bias):
    """Yaad's token-level switch: the l2 gradient inside ``||r||_2 <= delta_t``, ``delta_t`` times the (tanh-smoothed)
    l1 gradient outside (Miras Eq. 16, 26)."""

    gates: ClassVar[tuple[str, ...]] = ("huber_delta",)

    def grad(self, y, v, delta=None):
        r = y - v
        inside = (r * r).sum(-1, keepdim=True) <= delta * delta
        return torch.where(inside, r, delta * torch.tanh(self.spec.smoothing * r))

    def loss(self, y, v, delta=None):
        r = y - v
        a = self.spec.smoothing
        inside = (r * r).sum(-1) <= (delta * delta)[..., 0]
        return torch.where(inside, 0.5 * (r * r).sum(-1), delta[..., 0] * _log_cosh(a * r).sum(-1) / a)


@BIAS.register("omega")
class OmegaBias(Bias):
    """ATLAS' Omega rule (Eq. 9-11): token t's objective is ``sum_{i=t-c+1..t} gamma_i l_inner(M(k_i), v_i)``.

    ``grad``/``loss`` are the inner bias' row maps (the window weights gamma_i and the window sum are applied by the
    memory op, ``miras.ops_ext``); ``window`` c and the extra gate ``omega_gamma`` (plus the inner bias' gates).
    The window's gradients are all taken at the chunk-start state of token t (chunk size 1: exactly ATLAS Eq. 9-10).
    """

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.inner = BIAS.get(spec.inner.kind)(spec.inner)
        self.window = spec.window
        self.gates = ("omega_gamma", *self.inner.gates)
        self.exact_loss = self.inner.exact_loss

    def grad(self, y, v, delta=None):
        return self.inner.grad(y, v, delta)

    def loss(self, y, v, delta=None):
        return self.inner.loss(y, v, delta)
