"""Retention gates: how much of the old memory survives a write (Miras §4 "retention", §5.2).

    none     W_t = A_t,  A_t = A_{t-1} + update                                  (alpha = 1: DeltaNet, linear attention)
    decay    A_t = alpha_t A_{t-1} + update,  W_t = A_t                          (GDN, Titans Eq. 13 with alpha = 1 - a)
    lq       A_t = alpha_t A_{t-1} + update,  W_t = A_t / ||A_t||_q^(q-2)        (Moneta, Miras Eq. 24-25)
    kl       W_t = c softmax(alpha_t log W_{t-1} - eta_t g_t)                    (Memora, Miras Eq. 21, 27)
    elastic  W_t = S_gamma(alpha_t W_{t-1} - eta_t g_t)                          (Miras Eq. 22)

``update`` is the learner's (-eta g for GD, the momentum buffer S for momentum). kl and elastic are "lag-token" retentions:
their non-linear step is taken at the first token of each chunk and the rest of the chunk runs linearly (Miras Eq. 30);
with chunk size 1 this is the exact per-token rule.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from miras.registry import RETENTION


class Retention:
    """Base: the linear family (keep-gated accumulation, read W = A)."""

    lag: ClassVar[bool] = False  # non-linear step at the first token of each chunk
    normalizes: ClassVar[bool] = False  # read weights W = A / nu(A) (else W = A)
    needs_keep: ClassVar[bool] = True
    params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec) -> None:
        self.spec = spec
        self.grad_at = getattr(spec, "grad_at", "previous")

    def normalizer(self, A: Tensor) -> Tensor | None:
        """``nu(A)`` ``[B, H, 1, 1]`` such that the read weights are ``A / nu``; None when W = A."""
        return None

    def effective(self, A: list[Tensor]) -> list[Tensor]:
        """Read weights from the carried state."""
        out = []
        for a in A:
            nu = self.normalizer(a)
            out.append(a if nu is None else a / nu)
        return out

    def lag_step(self, W: Tensor, g: Tensor, keep: Tensor, lr: Tensor, params: dict[str, Tensor] | None) -> Tensor:
        """The non-linear step of a lag-token retention; W, g ``[B, H, in, out]``, keep, lr ``[B, H, 1, 1]``."""
        raise NotImplementedError


@RETENTION.register("none")
class NoRetention(Retention):
    """``alpha_t = 1``: nothing is forgotten."""

    needs_keep: ClassVar[bool] = False


@RETENTION.register("decay")
class DecayRetention(Retention):
    """Multiplicative keep gate ``A_t = alpha_t A_{t-1} + update`` (scalar, per head, or per key channel)."""


@RETENTION.register("lq")
class LqRetention(Retention):
    """Moneta's normalisation ``W = A / nu``, ``nu = (sum |A|^q + eps)^((q-2)/q)`` (= ||A||_q^(q-2) for eps -> 0).

    One nu per weight matrix and head; refreshed at the last token of every full chunk (exactly Moneta for chunk size 1).
    A call's partial last chunk reads with the nu of its chunk start, so an output never depends on where the input ends
    (causal prefix property); the carried state is A, and the next call starts from nu(A).
    """

    normalizes: ClassVar[bool] = True

    def normalizer(self, A: Tensor) -> Tensor:
        return lq_normalizer(A, self.spec.q, self.spec.eps)


def lq_normalizer(A: Tensor, q: float, eps: float) -> Tensor:
    """Moneta's ``nu(A) = (sum |A|^q + eps)^((q-2)/q)`` over the last two axes, kept as ``[..., 1, 1]`` (Miras Eq. 24-25)."""
    total = A.abs().pow(q).sum((-2, -1), keepdim=True)
    return (total + eps) ** ((q - 2.0) / q)


@RETENTION.register("kl")
class KLRetention(Retention):
    """Memora: ``W = c softmax(alpha log W_prev - eta g)`` over the last axis of each weight matrix.

    ``log`` reads ``max(W, tiny)``: the linear steps between lag tokens may push entries to <= 0 with large learning rates.
    """

    lag: ClassVar[bool] = True

    def lag_step(self, W, g, keep, lr, params):
        logw = torch.log(W.clamp_min(torch.finfo(W.dtype).tiny))
        return self.spec.scale * torch.softmax(keep * logw - lr * g, dim=-1)


@RETENTION.register("elastic")
class ElasticNetRetention(Retention):
    """Elastic net: ``W = S_gamma(alpha W_prev - eta g)``, ``S_gamma(z) = sign(z) relu(|z| - gamma)``, gamma per head."""

    lag: ClassVar[bool] = True
    params: ClassVar[tuple[str, ...]] = ("threshold",)

    def lag_step(self, W, g, keep, lr, params):
        gamma = params["threshold"][None, :, None, None]  # [1, H, 1, 1]
        z = keep * W - lr * g
        return torch.sign(z) * torch.relu(z.abs() - gamma)
