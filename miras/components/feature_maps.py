"""Feature maps phi applied to the (normalised) queries and keys before the memory (ATLAS §3.2).

    identity     phi(x) = x
    polynomial   phi(x) = sum_{i=1..p} a_i x^i  elementwise, a_i initialised to 1/i! (learnable)   (ATLAS Eq. 5, [R])
    exponential  phi(x) = (1, x, vec(x x^T) / sqrt(2!))  truncated at degree p <= 2                (ATLAS Eq. 22-23)

The exponential map uses the full tensor powers, so ``phi(q) . phi(k) = sum_{i<=p} (q.k)^i / i!`` (the Taylor series of
exp(q.k): DeepTransformers, ATLAS Eq. 25-26) and the memory's key dim becomes ``1 + d (+ d^2)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from miras.registry import FEATURE_MAP
from miras.spec import FeatureMapSpec

MAX_FEATURE_DIM = 4096


class FeatureMap:
    """Base of a registered feature map: ``dim(d)`` (the memory's key dim for head dim d) and ``__call__(x, coef)``."""

    def __init__(self, spec: FeatureMapSpec) -> None:
        self.spec = spec

    def dim(self, d: int) -> int:
        return d

    def __call__(self, x: Tensor, coef: Tensor | None = None) -> Tensor:
        return x


@FEATURE_MAP.register("identity")
class IdentityFeatureMap(FeatureMap):
    """``phi(x) = x``."""


@FEATURE_MAP.register("polynomial")
class PolynomialFeatureMap(FeatureMap):
    """``phi(x) = sum_{i=1..p} a_i x^i`` elementwise; ``coef`` = (a_1..a_p), initialised to 1/i! by the mixer."""

    def __call__(self, x: Tensor, coef: Tensor | None = None) -> Tensor:
        return polynomial_features(x, coef)


@FEATURE_MAP.register("exponential")
class ExponentialFeatureMap(FeatureMap):
    """ATLAS Eq. 22-23 truncated at ``degree`` <= 2: ``(1, x, vec(x x^T)/sqrt(2))``, key dim ``1 + d + d^2``."""

    def dim(self, d: int) -> int:
        return 1 + d + (d * d if self.spec.degree >= 2 else 0)

    def __call__(self, x: Tensor, coef: Tensor | None = None) -> Tensor:
        return exponential_features(x, self.spec.degree)


def feature_dim(spec: FeatureMapSpec, d: int) -> int:
    """The key dim the memory sees for head dim d: d, or ``1 + d + d^2`` (``1 + d`` at degree 1) for exponential."""
    return FEATURE_MAP.get(spec.kind)(spec).dim(d)


def exponential_features(x: Tensor, degree: int) -> Tensor:
    """``(1, x, vec(x x^T)/sqrt(2))`` over the last axis: ``[..., d] -> [..., 1 + d (+ d^2)]`` (ATLAS Eq. 22)."""
    parts = [torch.ones_like(x[..., :1]), x]
    if degree >= 2:
        outer = x[..., :, None] * x[..., None, :]
        parts.append(outer.flatten(-2) / math.sqrt(2.0))
    return torch.cat(parts, -1)


def polynomial_features(x: Tensor, coef: Tensor) -> Tensor:
    """``sum_i a_i x^i`` elementwise (a_1..a_p = coef)."""
    return sum(c * x**i for i, c in enumerate(coef, start=1))


__all__ = ["MAX_FEATURE_DIM", "FeatureMap", "exponential_features", "feature_dim", "polynomial_features"]
