"""The model spec: a pydantic description of a miras language model (no torch here).

A spec is a point of the Miras design space (Behrouz et al. 2025, arXiv:2504.13173, §4) extended by the later
papers of the line. Six axes describe the memory of a layer:

    memory architecture   ``memory.memory``     linear (matrix) or deep MLP memory; ``memory.feature_map`` for q/k
    attentional bias      ``memory.bias``       the inner objective l(M; k, v): dot, l2, lp, huber (omega: later)
    retention gate        ``memory.retention``  how much of the old memory survives: none, decay, lq, kl, elastic
    learning rule         ``memory.learner``    how the inner objective updates memory: gd, momentum (muon, dgd: later)
    depth taper           ``taper``             channel-MLP width per layer: uniform, linear, cosine, reverse
    caching policy        ``memory.caching``    Memory Caching: segment caches and their aggregation (MC §3)

Symbols follow Miras: ``eta`` is the inner learning rate, ``alpha`` the retention *keep* fraction, ``mu`` the momentum
decay (Titans calls them theta, 1 - alpha and eta; see shared/reference/papers.md §0.2).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from miras.errors import NotImplementedYet, SpecError
from miras.train_spec import TrackingSpec, TrainSpec

# --------------------------------------------------------------------------------------------------------------- base


class Spec(BaseModel):
    """Base of every spec: unknown keys are errors, values are immutable once validated.

    A partial section inherits the field's own default: with ``delta`` defaulting to ``GateSpec(init=1, hi=4)``,
    ``delta: {init: 2}`` keeps ``hi=4`` (unless the section names another ``kind``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _inherit_field_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            default = getattr(field, "default", None) if field is not None else None
            if isinstance(value, dict) and isinstance(default, Spec):
                base = default.model_dump()
                if value.get("kind", base.get("kind")) == base.get("kind"):
                    out[name] = deep_merge(base, value)
        return out


class GateSpec(Spec):
    """How one data-dependent gate is produced from the token: ``g_t = lo + (hi - lo) * sigmoid(x_t W + b)``.

    ``granularity``: ``scalar`` (one value per layer, shared by heads), ``head`` (one per head) or ``channel``
    (one per head and key channel; only the retention gate of a linear memory takes it).
    ``rank``: 0 for a full ``d_model -> n`` projection, r > 0 for a low-rank ``d_model -> r -> n`` one (RWKV-7 style).
    ``data_dependent``: false gives a learned constant (bias only).
    ``init``: the gate's value at initialisation for a zero input (sets the bias); must lie strictly between lo and hi.
    """

    granularity: Literal["scalar", "head", "channel"] = "head"
    rank: int = Field(0, ge=0)
    data_dependent: bool = True
    init: float = 0.5
    lo: float = 0.0
    hi: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> GateSpec:
        if not self.lo < self.hi:
            raise ValueError(f"lo must be < hi, but got lo={self.lo}, hi={self.hi}")
        if not self.lo < self.init < self.hi:
            raise ValueError(f"init must lie strictly inside (lo, hi) = ({self.lo}, {self.hi}), but got init={self.init}")
        return self


# ------------------------------------------------------------------------------------------------ memory architecture


class LinearMemorySpec(Spec):
    """Matrix memory ``M(x) = x W`` with ``W: [d_key, d_value]`` per head (linear attention, DeltaNet, GDN)."""

    kind: Literal["linear"] = "linear"


class MLPMemorySpec(Spec):
    """Deep memory ``M(x) = x + LN(sigma(... sigma(x W_1) ...) W_L)`` (Titans §3.1, Miras §5.3).

    ``depth`` L >= 1 layers; hidden width ``expansion * d_key`` (rounded); ``residual`` adds x (needs d_key == d_value,
    always true here); ``norm`` applies a per-head LayerNorm with learnable affine (outer-loop) parameters.
    """

    kind: Literal["mlp"] = "mlp"
    depth: int = Field(2, ge=1, le=8)
    expansion: float = Field(4.0, gt=0)
    activation: Literal["gelu", "silu", "tanh", "relu"] = "gelu"
    residual: bool = True
    norm: bool = True


class FeatureMapSpec(Spec):
    """Feature map phi applied to q and k before the memory (ATLAS §3.2).

    ``identity``: phi(x) = x. ``polynomial``: the elementwise Taylor form ``phi(x) = sum_{i=1..degree} a_i x^i`` with
    coefficients a_i initialised to 1/i! and learnable when ``learnable`` (reconstruction [R] of papers.md §3.2).
    ``exponential``: ATLAS Eq. 22-23 truncated at ``degree`` <= 2 with full tensor powers,
    ``phi(x) = (1, x, vec(x x^T)/sqrt(2!))`` so that ``phi(q).phi(k) = 1 + q.k + (q.k)^2/2`` (d_key = 1 + d + d^2;
    fixed, not learnable; for small head dims only: 1 + d + d^2 <= 4096).
    """

    kind: Literal["identity", "polynomial", "exponential"] = "identity"
    degree: int = Field(2, ge=1, le=6)
    learnable: bool = True

    @model_validator(mode="after")
    def _check_exponential(self) -> FeatureMapSpec:
        if self.kind == "exponential" and self.degree > 2:
            raise ValueError(
                f"degree: the exponential feature map uses full tensor powers, implemented up to order 2 (key dim "
                f"1 + d + d^2), but got degree={self.degree}; use degree 1 or 2, or kind: polynomial"
            )
        return self


# -------------------------------------------------------------------------------------------------- attentional bias


class DotBiasSpec(Spec):
    """Dot-product bias ``l = -<M(k), v>`` (Hebbian; Miras Eq. 8)."""

    kind: Literal["dot"] = "dot"


class L2BiasSpec(Spec):
    """L2 regression ``l = 1/2 ||M(k) - v||^2`` (delta rule; Miras Eq. 9, Titans Eq. 12 up to the factor 2)."""

    kind: Literal["l2"] = "l2"


class LpBiasSpec(Spec):
    """Lp regression ``l = ||M(k) - v||_p^p`` (Miras Eq. 10-11), smoothed as in Miras Remark 5.

    ``sign(r) ~ tanh(smoothing * r)``, ``|r| ~ sqrt(r^2 + eps)``.
    """

    kind: Literal["lp"] = "lp"
    p: float = Field(3.0, ge=1.0)
    smoothing: float = Field(10.0, gt=0)
    eps: float = Field(1e-6, gt=0)


class HuberBiasSpec(Spec):
    """Yaad's token-level Huber switch (Miras Eq. 16, 26).

    ``grad = grad l2`` when ``||M(k) - v||_2 <= delta_t``, else ``delta_t * grad l1``; delta_t is a learned,
    data-dependent gate in (0, ``delta.hi``). The l1 sign is smoothed by tanh(smoothing * r).
    """

    kind: Literal["huber"] = "huber"
    delta: GateSpec = GateSpec(init=1.0, lo=0.0, hi=4.0)
    smoothing: float = Field(10.0, gt=0)


class OmegaBiasSpec(Spec):
    """ATLAS Omega rule (ATLAS Eq. 9-11): the loss of token t is the gamma-weighted sum of a row-wise bias over the
    sliding window of the last ``window`` tokens, ``sum_{i=t-c+1..t} gamma_i l_inner(M(k_i), v_i)``.

    ``inner``: the row-wise bias inside the window (l2 gives ATLAS' Omega rule; dot, lp, huber also work);
    ``gamma``: the data-dependent window gate gamma_i in (lo, hi). ``window`` c = 1 is the inner bias with eta*gamma.
    """

    kind: Literal["omega"] = "omega"
    window: int = Field(4, ge=1)
    inner: Annotated[DotBiasSpec | L2BiasSpec | LpBiasSpec | HuberBiasSpec, Field(discriminator="kind")] = L2BiasSpec()
    gamma: GateSpec = GateSpec(init=0.9)

    @model_validator(mode="before")
    @classmethod
    def _inner_shorthand(cls, data: Any) -> Any:
        """``inner: huber`` is shorthand for ``inner: {kind: huber}``."""
        if isinstance(data, dict) and isinstance(data.get("inner"), str):
            data = {**data, "inner": {"kind": data["inner"]}}
        return data


BiasSpec = Annotated[DotBiasSpec | L2BiasSpec | LpBiasSpec | HuberBiasSpec | OmegaBiasSpec, Field(discriminator="kind")]

# --------------------------------------------------------------------------------------------------- retention gates

GradAt = Literal["decayed", "previous"]


class NoRetentionSpec(Spec):
    """No retention: ``alpha_t = 1`` (DeltaNet, linear attention, TTT)."""

    kind: Literal["none"] = "none"


class DecayRetentionSpec(Spec):
    """Multiplicative decay with keep gate alpha_t (l2 global retention; GDN, Titans Eq. 13, Miras Eq. 9).

    ``grad_at: decayed``  ``W_t = alpha_t W_{t-1} - eta_t grad l(alpha_t W_{t-1})``   (Gated DeltaNet / Miras Eq. 9)
    ``grad_at: previous`` ``W_t = alpha_t W_{t-1} - eta_t grad l(W_{t-1})``           (Titans Eq. 13, alpha = 1 - a)
    """

    kind: Literal["decay"] = "decay"
    gate: GateSpec = GateSpec(init=0.99)
    grad_at: GradAt = "previous"


class LqRetentionSpec(Spec):
    """Moneta's lq normalisation (Miras Eq. 24-25): ``A_t = alpha_t A_{t-1} - eta_t grad``, ``W_t = A_t / ||A_t||_q^(q-2)``.

    The norm is per weight matrix and head, refreshed at the last token of every chunk (Moneta's chunked form).
    """

    kind: Literal["lq"] = "lq"
    q: float = Field(4.0, ge=2.0)
    gate: GateSpec = GateSpec(init=0.99)
    grad_at: GradAt = "previous"
    eps: float = Field(1e-6, gt=0)


class KLRetentionSpec(Spec):
    """Memora's KL retention (Miras Eq. 21, 27): ``W_t = c * softmax(alpha_t log W_{t-1} - eta_t grad l(W_{t-1}))``.

    Softmax over the output axis of every weight matrix; the memory stays positive with rows summing to ``scale``.
    Chunked form: the softmax step is taken at the first (lag) token of each chunk, the rest runs linearly (Miras Eq. 30).
    """

    kind: Literal["kl"] = "kl"
    scale: float = Field(1.0, gt=0)
    gate: GateSpec = GateSpec(init=0.99)


class ElasticNetRetentionSpec(Spec):
    """Elastic-net retention (Miras Eq. 22): ``W_t = S_gamma(alpha_t W_{t-1} - eta_t grad l(W_{t-1}))``.

    ``S_gamma`` is the soft threshold (hard forgetting); alpha_t the soft forgetting; gamma a learned per-head threshold
    initialised to ``threshold``. As for KL, the non-linear step is taken at the lag token of each chunk.
    """

    kind: Literal["elastic"] = "elastic"
    gate: GateSpec = GateSpec(init=0.99)
    threshold: float = Field(1e-3, gt=0)


RetentionSpec = Annotated[
    NoRetentionSpec | DecayRetentionSpec | LqRetentionSpec | KLRetentionSpec | ElasticNetRetentionSpec,
    Field(discriminator="kind"),
]

# ---------------------------------------------------------------------------------------------------- learning rules


def _default_lr() -> GateSpec:
    return GateSpec(init=0.1, lo=0.0, hi=1.0)


class GDLearnerSpec(Spec):
    """Gradient descent on the inner objective: ``W_t = alpha_t W_{t-1} - eta_t grad`` (Titans Eq. 8, Miras Eq. 5).

    ``chunk_size`` b: the gradients of a chunk are taken at the chunk-start state (Titans Eq. 16, Miras Eq. 28);
    b = 1 is the pure online rule.
    """

    kind: Literal["gd"] = "gd"
    lr: GateSpec = Field(default_factory=_default_lr)
    chunk_size: int = Field(16, ge=1)


class MomentumLearnerSpec(Spec):
    """GD with momentum (Titans Eq. 13-14): ``S_t = mu_t S_{t-1} - eta_t grad``, ``W_t = alpha_t W_{t-1} + S_t``."""

    kind: Literal["momentum"] = "momentum"
    lr: GateSpec = Field(default_factory=_default_lr)
    momentum: GateSpec = GateSpec(init=0.9)
    chunk_size: int = Field(16, ge=1)


class MuonLearnerSpec(Spec):
    """ATLAS Muon (Eq. 32-33, descent-consistent): ``S_t = mu_t S_{t-1} - eta_t grad``, ``W_t = alpha_t W_{t-1} +
    NS_k(S_t)`` with ``steps`` k Newton-Schulz iterations per weight matrix.

    ``coefficients``: ``quintic`` (3.4445, -4.7750, 2.0315; Muon's, singular values end in ~[0.7, 1.2]) or ``cubic``
    (1.5, -0.5, 0; converges to the orthogonal polar factor U V^T as k grows).
    """

    kind: Literal["muon"] = "muon"
    lr: GateSpec = Field(default_factory=_default_lr)
    momentum: GateSpec = GateSpec(init=0.9)
    steps: int = Field(5, ge=1)
    coefficients: Literal["quintic", "cubic"] = "quintic"
    chunk_size: int = Field(16, ge=1)


class DGDLearnerSpec(Spec):
    """Delta gradient descent (NL Eq. 57): ``W_t = (alpha_t I - eta_t k_t^T k_t) W_{t-1} - eta_t grad`` in miras' [K, V]
    row convention (the projector acts on the key side).

    ``mlp_form``: for an MLP memory, ``first_layer`` applies the projector to the input side of the first layer (the
    only layer whose input is k), ``none`` turns it off (plain GD).
    """

    kind: Literal["dgd"] = "dgd"
    lr: GateSpec = Field(default_factory=_default_lr)
    chunk_size: int = Field(16, ge=1)
    mlp_form: Literal["first_layer", "none"] = "first_layer"


LearnerSpec = Annotated[
    GDLearnerSpec | MomentumLearnerSpec | MuonLearnerSpec | DGDLearnerSpec, Field(discriminator="kind")
]

# ---------------------------------------------------------------------------------------------------- caching policy


class CachingSpec(Spec):
    """Memory Caching (arXiv 2602.24281, §3): cache end-of-segment memory states and aggregate their reads.

    ``residual``        y_t = M_t(q_t) + sum_i M^(i)(q_t)                                         (MC §3.2, variant 1)
    ``gated_residual``  y_t = sum_i gamma_t^(i) M^(i)(q_t), gamma = softmax_i(<x_t W_u, pool_i>)   (variant 2, GRM)
    ``soup``            y_t = M(q_t; sum_i gamma_t^(i) W^(i)): mix the parameters, read once         (variant 3)
    ``sparse_selective``  GRM over the online memory and the ``top_k`` best-scoring caches            (variant 4, SSC)

    ``segmentation``: ``constant`` (segments of ``segment_length``) or ``logarithmic`` (lengths C, C, 2C, 4C, ...:
    boundaries at 0 and C * 2^j). ``write``: ``continue`` (each segment starts from the previous end state) or ``fresh``
    (each segment starts from the learned initial state). ``post_training``: the training-free form for length
    extrapolation: uniform (moving-average) weights over the caches and the online memory instead of learned gates
    (gated_residual or soup only; adds no parameters). The pool of the current segment is its causal running mean.
    """

    kind: Literal["none", "residual", "gated_residual", "soup", "sparse_selective"] = "none"
    segment_length: int = Field(256, ge=1)
    segmentation: Literal["constant", "logarithmic"] = "constant"
    top_k: int = Field(2, ge=1)
    write: Literal["continue", "fresh"] = "continue"
    post_training: bool = False

    @model_validator(mode="after")
    def _check(self) -> CachingSpec:
        if self.post_training and self.kind not in ("gated_residual", "soup"):
            raise ValueError(
                f"post_training replaces learned gates by a moving average, so it needs kind gated_residual or soup, "
                f"but got kind={self.kind!r}"
            )
        return self

    @property
    def gated(self) -> bool:
        """Whether the aggregation has learned gates (and so the connector projection W_u)."""
        return self.kind in ("gated_residual", "soup", "sparse_selective") and not self.post_training

    def segment_bounds(self, seq_len: int) -> list[tuple[int, int]]:
        """``[(start, end), ...]`` of the segments covering ``seq_len`` tokens (the last one may be cut short)."""
        C, out, start = self.segment_length, [], 0
        while start < seq_len:
            end = start + C if self.segmentation == "constant" or start == 0 else 2 * start
            out.append((start, min(end, seq_len)))
            start = end
        return out


# ------------------------------------------------------------------------------------------- TNT hierarchical memory


class LocalMemoriesSpec(Spec):
    """TNT local memories (Li et al. 2025, arXiv:2511.07343, §5.2, Eq. 5-7, App. E Eq. 13-15).

    With ``memory.local`` set, a memory layer holds one global memory (the layer's memory/bias/retention/learner axes
    with chunk ``C_G = learner.chunk_size``, read with its chunk-start state) plus N local memories, local i with its
    own chunk ``chunk_sizes[i]`` (C_L), shard length ``shard_lengths[i]`` (S_L; 0 = never reset) and a learned initial
    state it is reset to at every shard boundary:

        o_t = M(q_t; V_{xi(t, C_G)}) + sum_i M(Pi_t^(i) q_t; W_t^(i)),  Pi_t = sum_{shard start <= s <= t} k_s k_s^T

    ``shard_lengths``: one entry shared by every local memory, or one per local memory; each a multiple of its chunk.
    ``qk_projection``: read the local memories with ``Pi_t q_t`` (TNT Eq. 7, keys l2-normalised) instead of ``q_t``.
    ``global_memory``: false drops the global memory (the TNT ablation "no global memory").
    Stage two (TNT §5.3) changes only ``chunk_sizes`` (``miras train --from CKPT --set memory.local.chunk_sizes=[..]``).
    """

    chunk_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [8], min_length=1)
    shard_lengths: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [64], min_length=1)
    qk_projection: bool = True
    global_memory: bool = True

    @model_validator(mode="after")
    def _check(self) -> LocalMemoriesSpec:
        n, errors = len(self.chunk_sizes), []
        if len(self.shard_lengths) not in (1, n):
            raise ValueError(
                f"shard_lengths: give one shard length for all local memories or one per local memory, but got "
                f"{len(self.shard_lengths)} shard lengths for {n} chunk sizes (chunk_sizes={self.chunk_sizes})"
            )
        for i, (c, s) in enumerate(zip(self.chunk_sizes, self.shards)):
            if s and s % c:
                j = i if len(self.shard_lengths) == n else 0
                errors.append(
                    f"shard_lengths[{j}]: a shard must be a whole number of local chunks (its memory resets at a chunk "
                    f"boundary), but got shard_lengths[{j}]={s} for chunk_sizes[{i}]={c}; use a multiple of {c} "
                    f"(>= {c}) or 0 (no reset)"
                )
        if errors:
            raise ValueError("\n".join(errors))
        return self

    @property
    def shards(self) -> list[int]:
        """Shard length of every local memory (0 = no reset)."""
        return self.shard_lengths * len(self.chunk_sizes) if len(self.shard_lengths) == 1 else list(self.shard_lengths)


# --------------------------------------------------------------------------------------------------- the memory layer


class MemorySpec(Spec):
    """A memory token mixer: projections, short convs, the memory axes, the output norm and gate.

        q, k, v = [l2norm] SiLU(conv(x W_q|k|v));  y = memory_scan(...);  o = W_o(norm(y) * sigmoid(x W_g))

    (Titans §4.4 and Miras §5.3 block; the exact output-gate form is a reconstruction [R], papers.md §1.2.)
    """

    memory: Annotated[LinearMemorySpec | MLPMemorySpec, Field(discriminator="kind")] = MLPMemorySpec()
    feature_map: FeatureMapSpec = FeatureMapSpec()
    bias: BiasSpec = L2BiasSpec()
    retention: RetentionSpec = DecayRetentionSpec()
    learner: LearnerSpec = MomentumLearnerSpec()
    caching: CachingSpec = CachingSpec()
    local: LocalMemoriesSpec | None = Field(None, description="TNT local memories (None: a single memory)")
    conv_size: int = Field(4, ge=0, description="depthwise causal conv after q/k/v projections; 0 turns it off")
    qk_norm: bool = True
    qkv_activation: Literal["silu", "none"] = "silu"
    output_norm: bool = True
    output_gate: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """``bias: l2`` is shorthand for ``bias: {kind: l2}``; a section without ``kind`` keeps the default kind."""
        if isinstance(data, dict):
            data = dict(data)
            for axis in ("memory", "feature_map", "bias", "retention", "learner", "caching"):
                value = data.get(axis)
                if isinstance(value, str):
                    data[axis] = {"kind": value}
                elif isinstance(value, dict) and "kind" not in value:
                    data[axis] = {"kind": cls.model_fields[axis].default.kind, **value}
        return data

    @property
    def axes(self) -> dict[str, str]:
        """The five per-layer axis names (taper lives on the model)."""
        return {
            "memory": self.memory.kind if self.memory.kind == "linear" else f"mlp{self.memory.depth}",
            "bias": self.bias.kind,
            "retention": self.retention.kind,
            "learner": self.learner.kind,
            "caching": self.caching.kind,
        }

    @model_validator(mode="after")
    def _cross_check(self) -> MemorySpec:
        errors: list[str] = []
        for axis in ("bias", "learner"):
            sub = getattr(self, axis)
            if not getattr(sub, "implemented", True):
                raise NotImplementedYet(
                    f"{axis}.kind: {sub.kind!r} is part of the schema but not implemented yet in this version of miras; "
                    f"choose one of {', '.join(_IMPLEMENTED[axis])}."
                )
        if self.caching.kind == "soup" and self.memory.kind == "mlp" and self.retention.kind in ("kl", "elastic"):
            raise NotImplementedYet(
                f"caching.kind: 'soup' on an MLP memory mixes per-token weights and is not implemented yet for the "
                f"lag-token retention {self.retention.kind!r}; use gated_residual, or retention none, decay or lq."
            )
        ret, learner = self.retention, self.learner
        if ret.kind in ("kl", "elastic") and learner.kind != "gd":
            errors.append(
                f"learner.kind: retention {ret.kind!r} updates the memory non-linearly and is defined with plain GD "
                f"(Miras Eq. 21-23), but got learner.kind={learner.kind!r}; use learner.kind: gd."
            )
        gates = {"retention.gate": getattr(ret, "gate", None), "learner.lr": learner.lr,
                 "learner.momentum": getattr(learner, "momentum", None)}
        if isinstance(self.bias, HuberBiasSpec):
            gates["bias.delta"] = self.bias.delta
        if isinstance(self.bias, OmegaBiasSpec):
            gates["bias.gamma"] = self.bias.gamma
            if isinstance(self.bias.inner, HuberBiasSpec):
                gates["bias.inner.delta"] = self.bias.inner.delta
        for path, gate in gates.items():
            if gate is None or gate.granularity != "channel":
                continue
            if path != "retention.gate" or ret.kind not in ("decay",) or self.memory.kind != "linear":
                errors.append(
                    f"{path}.granularity: 'channel' is only supported for the decay retention gate of a linear memory "
                    f"(GLA-style key-channel decay), but got it on {path} with memory.kind={self.memory.kind!r}, "
                    f"retention.kind={ret.kind!r}; use 'head' or 'scalar'."
                )
        # ATLAS / DGD options (ops_ext helper)
        if self.caching.kind == "soup" and (isinstance(self.bias, OmegaBiasSpec) or learner.kind in ("muon", "dgd")):
            errors.append(
                f"caching.kind: the memory-soup read is written for the dual form of gd / momentum without a window, but "
                f"got caching.kind='soup' with bias.kind={self.bias.kind!r}, learner.kind={learner.kind!r}; use another "
                "caching kind."
            )
        if isinstance(self.bias, OmegaBiasSpec):
            if getattr(ret, "grad_at", "previous") == "decayed" and self.bias.window > 1:
                errors.append(
                    "retention.grad_at: the omega bias evaluates its window's gradients at the chunk-start state, which "
                    "is only defined with grad_at 'previous', but got retention.grad_at='decayed'; use 'previous'."
                )
        if self.feature_map.kind == "exponential" and self.memory.kind == "mlp" and self.memory.residual:
            errors.append(
                "memory.residual: the exponential feature map changes d_key to 1 + d + d^2, and a residual MLP memory "
                "needs d_key == d_value, but got memory.residual=True; set memory.residual: false."
            )
        if ret.kind in ("kl",) and self.memory.kind == "mlp" and self.memory.norm is False and self.memory.residual:
            pass  # positive weights with residual are fine; nothing to check
        if errors:
            raise ValueError("\n".join(errors))
        return self


_IMPLEMENTED = {"bias": ["dot", "l2", "lp", "huber", "omega"], "learner": ["gd", "momentum", "muon", "dgd"]}

# the spec classes of each extensible axis (register_spec appends to these)
_AXIS_SPECS: dict[str, list[type[Spec]]] = {
    "memory": [LinearMemorySpec, MLPMemorySpec],
    "bias": [DotBiasSpec, L2BiasSpec, LpBiasSpec, HuberBiasSpec, OmegaBiasSpec],
    "retention": [NoRetentionSpec, DecayRetentionSpec, LqRetentionSpec, KLRetentionSpec, ElasticNetRetentionSpec],
    "learner": [GDLearnerSpec, MomentumLearnerSpec, MuonLearnerSpec, DGDLearnerSpec],
}


def register_spec(axis: str, spec_cls: type[Spec]) -> type[Spec]:
    """Add a third-party spec class (with a ``kind: Literal["name"]`` field) to one axis of ``MemorySpec``.

    Pair it with an implementation registered under the same kind in :mod:`miras.registry` (see README, "Extending").
    Usable as a decorator: ``@register_spec("bias")``.
    """
    from pydantic.fields import FieldInfo

    if axis not in _AXIS_SPECS:
        raise SpecError(f"register_spec: axis must be one of {', '.join(_AXIS_SPECS)}, but got axis={axis!r}")
    field = spec_cls.model_fields.get("kind")
    kind = field.default if field is not None else None
    if not isinstance(kind, str):
        raise SpecError(f"register_spec: {spec_cls.__name__} needs a field `kind: Literal[\"name\"] = \"name\"`")
    taken = {c.model_fields["kind"].default for c in _AXIS_SPECS[axis]}
    if kind in taken:
        raise SpecError(f"register_spec: {axis} kind {kind!r} is already registered; pick another name")
    _AXIS_SPECS[axis].append(spec_cls)
    union = Annotated[Union[tuple(_AXIS_SPECS[axis])], Field(discriminator="kind")]  # noqa: UP007
    default = MemorySpec.model_fields[axis].default
    MemorySpec.model_fields[axis] = FieldInfo.from_annotated_attribute(union, default)
    MemorySpec.model_rebuild(force=True)
    ModelSpec.model_rebuild(force=True)
    if axis in _IMPLEMENTED:
        _IMPLEMENTED[axis].append(kind)
    return spec_cls

# ------------------------------------------------------------------------------------------------------ the model


class AttentionSpec(Spec):
    """Softmax attention (SDPA) used by ``attn``/``swa`` blocks and the Titans hybrids.

    ``window``: sliding-window size for ``swa``, ``mag`` and ``mal`` blocks. ``persistent_tokens`` N_p: learnable
    prefix tokens (Titans Eq. 19) for hybrids. ``rope``: rotary position embeddings on q and k.
    """

    window: int = Field(64, ge=1)
    persistent_tokens: int = Field(0, ge=0)
    rope: bool = True
    rope_base: float = Field(10000.0, gt=0)


class MACSpec(Spec):
    """Titans Memory-as-Context (Eq. 21-25): segment length C of the block-diagonal attention."""

    segment_length: int = Field(32, ge=1)


class TaperSpec(Spec):
    """Depth taper of the channel-MLP widths (Tapered LMs, arXiv 2606.23670).

    ``d_l`` for l = 0..L-1 with ``mean(d_l) == d_ff`` preserved exactly after rounding to ``multiple``:
    ``uniform`` d_ff; ``linear`` from start*d_ff to end*d_ff; ``cosine`` ``end + (start-end)(1+cos(pi l/(L-1)))/2``;
    ``reverse`` the cosine schedule reversed (narrow to wide).
    """

    kind: Literal["uniform", "linear", "cosine", "reverse"] = "uniform"
    start: float = Field(1.5, gt=0)
    end: float = Field(0.5, gt=0)
    multiple: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> TaperSpec:
        if self.kind != "uniform" and self.start + self.end != 2.0:
            raise ValueError(
                f"start + end must equal 2 so that the mean width is d_ff (budget preserved), but got "
                f"start={self.start}, end={self.end}"
            )
        return self


# ------------------------------------------------------------------------------------- Nested Learning / Hope (hope)


class CMSSpec(Spec):
    """Continuum Memory System (Nested Learning §7.1, Eq. 70-71, arXiv:2512.24695): k MLP levels, level l updated
    every ``periods[l]`` tokens from its accumulated error signal (see ``miras/components/cms.py``).

    ``periods``: C(l) per level, fast to slow; null or 0 = never updated (a plain MLP). The finite periods must each
    divide the next (C(l-1) | C(l), NL §7.1 as restated by the Sleep paper). ``variant``: ``chain`` (Eq. 70, levels in
    series, each a residual block) or ``independent`` (Eq. 74, head-wise: learnable weighted sum of the levels).
    ``block``: the MLP form of each level. ``widths``: per-level multipliers of the layer's channel width (default 1).
    ``objective``: the inner loss, ``reconstruction`` ``1/2 ||MLP(h) - h||^2`` or ``projection``
    ``1/2 ||MLP(h) - h W_T||^2`` (W_T learned). ``lr``: the inner learning rate eta_t (a scalar gate per level).
    ``max_update``: each period's update of a weight matrix is rescaled to at most this fraction of its norm.
    """

    periods: list[int | None] = Field(default_factory=lambda: [16, 64], min_length=1, max_length=8)
    variant: Literal["chain", "independent"] = "chain"
    block: Literal["swiglu", "gelu"] = "swiglu"
    widths: list[float] | None = None
    objective: Literal["reconstruction", "projection"] = "reconstruction"
    lr: GateSpec = GateSpec(granularity="scalar", init=0.01, lo=0.0, hi=1.0)
    max_update: float | None = Field(0.1, gt=0, description="trust region: ||update||_F <= max_update * ||W||_F per "
                                     "weight matrix and period (null: the unclipped Eq. 71)")

    @model_validator(mode="after")
    def _check(self) -> CMSSpec:
        errors = []
        prev: tuple[int, int] | None = None
        for i, c in enumerate(self.periods):
            if c is None or c == 0:
                continue
            if c < 0:
                errors.append(f"periods[{i}]: an update period must be >= 1 (or null/0 for never), but got {c}")
            elif prev is not None and c % prev[1]:
                errors.append(
                    f"periods[{i}]: each finite update period must be a multiple of the previous one (C(l-1) | C(l), "
                    f"NL §7.1), but got periods[{prev[0]}]={prev[1]}, periods[{i}]={c}"
                )
            else:
                prev = (i, c)
        if self.widths is not None:
            if len(self.widths) != len(self.periods):
                errors.append(
                    f"widths: must give one multiplier per level ({len(self.periods)}), but got {len(self.widths)}"
                )
            for i, w in enumerate(self.widths):
                if not w > 0:
                    errors.append(f"widths[{i}]: a width multiplier must be > 0, but got {w}")
        if errors:
            raise ValueError("\n".join(errors))
        return self


class SelfModSpec(Spec):
    """Self-modifying Titans (NL §8.1-8.2, Eq. 83-88), block kind ``selfmod`` (see ``miras/components/selfmod.py``).

    ``chunk_size``: the chunk at whose boundaries k, v, eta, alpha and the self-generated targets v_hat are produced
    (the memories M_k, M_v, M_eta, M_alpha are read with the state of the previous chunk end); the output memory's
    own gradient chunk is ``memory.learner.chunk_size`` (the paper's two chunk sizes).
    """

    chunk_size: int = Field(16, ge=1)
    v_norm: bool = Field(
        True,
        description="l2-normalize v_t = M_v(x_t) (a stabiliser [R]: the paper normalizes q and k only; without it the "
        "self-generated targets M(v) grow from chunk to chunk and the inner updates diverge at eta >= 0.05)",
    )


class ChannelMLPSpec(Spec):
    """Channel mixer after each token mixer: ``swiglu`` (Llama), ``gelu`` (GPT), ``cms`` (Continuum Memory System,
    options in ``cms``) or ``none``. Width = expansion * d_model (per CMS level: times ``cms.widths``)."""

    kind: Literal["swiglu", "gelu", "none", "cms"] = "swiglu"
    expansion: float = Field(4.0, gt=0)
    cms: CMSSpec = CMSSpec()


class BudgetSpec(Spec):
    """A parameter budget: the solver adjusts ``knob`` until ``|count_params - params| <= tolerance * params``."""

    params: int = Field(ge=1)
    tolerance: float = Field(0.05, ge=0, lt=1)
    knob: Literal["d_model", "mlp_expansion", "n_layers"] = "d_model"


# ------------------------------------------------------------------------------- trellis and ms-ssm (reconstructions)


class TrellisSpec(Spec):
    """Trellis slot memory (arXiv 2512.23852; reconstruction [R] of papers.md §8.1, see miras/components/trellis.py).

    ``slots`` m key/value slots per head, written token by token in two passes (keys, then values) by one online GD
    step with inner learning rate ``lr`` (theta_t) and keep gate ``keep`` (alpha_t, the fraction kept); read
    ``y = V^T softmax(s K q)`` with a learned per-head inverse temperature s initialised to ``score_scale``.
    ``conv_size``: depthwise causal conv after the q/k/v projections (0 turns it off).
    """

    slots: int = Field(32, ge=1)
    score_scale: float = Field(8.0, gt=0)
    lr: GateSpec = GateSpec(init=0.5, lo=0.0, hi=1.0)
    keep: GateSpec = GateSpec(init=0.99, lo=0.0, hi=1.0)
    conv_size: int = Field(4, ge=0)
    output_norm: bool = True
    output_gate: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrellisSpec:
        errors = []
        for name in ("lr", "keep"):
            g = getattr(self, name)
            if g.granularity == "channel":
                errors.append(f"{name}.granularity: Trellis gates are per head, but got granularity='channel'; "
                              "use head or scalar")
            if g.lo < 0.0 or g.hi > 1.0:
                bad = "lo" if g.lo < 0.0 else "hi"
                errors.append(f"{name}.{bad}: a Trellis gate must stay inside [0, 1], but got lo={g.lo}, hi={g.hi}")
        if errors:
            raise ValueError("\n".join(errors))
        return self


class MSSSMSpec(Spec):
    """MS-SSM multi-scale selective SSM (arXiv 2512.23824; reconstruction [R] of papers.md §8.2, miras/components/msssm.py).

    ``scales`` S recursive dilated causal depthwise convs (kernel ``kernel_size``, dilation 2^(s-1)) give S details plus
    one approximation; each of the S + 1 scales runs a diagonal selective SSM with ``d_state`` N states per channel
    (``dt_rank``: low-rank dt projection, default ceil(d_model / 16)); dt starts log-uniform in [dt_min, dt_max] and
    2^-g smaller at scale g. ``mixer``: softmax (or unconstrained linear) input-dependent mix of the scales.
    ``expand``: inner width E = expand * d_model. ``chunk_size``: tokens per chunk of the log-depth parallel scan (1 is
    the plain recurrence, fastest on CPU; both are exact).
    """

    scales: int = Field(3, ge=1, le=10)
    kernel_size: int = Field(2, ge=1)
    d_state: int = Field(8, ge=1)
    expand: float = Field(1.0, gt=0)
    dt_rank: int | None = Field(None, ge=1)
    dt_min: float = Field(0.001, gt=0)
    dt_max: float = Field(0.1, gt=0)
    mixer: Literal["softmax", "linear"] = "softmax"
    gate: bool = True
    chunk_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> MSSSMSpec:
        if not self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min: must be <= dt_max, but got dt_min={self.dt_min}, dt_max={self.dt_max}")
        return self


def _trellis_msssm_errors(spec: ModelSpec) -> list[str]:
    """Cross-field checks of ``hybrid_memory`` (which memory the Titans hybrids mac/mag/mal hold)."""
    errors = []
    if spec.hybrid_memory == "msssm" and "mac" in spec.blocks:
        errors.append(
            "hybrid_memory: a mac block reads its memory with queries (Titans Eq. 21) and MS-SSM has no query read, "
            "but got hybrid_memory='msssm' with a mac block in layout; use mag or mal, or hybrid_memory lmm | trellis"
        )
    if spec.hybrid_memory != "lmm" and spec.memory.local is not None and any(b in ("mag", "mal") for b in spec.blocks):
        errors.append(
            f"hybrid_memory: TNT local memories (memory.local) live in the lmm memory, but got "
            f"hybrid_memory={spec.hybrid_memory!r}; use hybrid_memory: lmm or drop memory.local"
        )
    return errors


BlockKind = Literal["lmm", "mac", "mag", "mal", "attn", "swa", "selfmod", "trellis", "msssm"]
BLOCK_DESCRIPTIONS = {
    "lmm": "memory token mixer only (Titans LMM, Miras models, DeltaNet, ...)",
    "mac": "Titans Memory as a Context (Eq. 21-25)",
    "mag": "Titans Memory as a Gate (Eq. 26-28)",
    "mal": "Titans Memory as a Layer (Eq. 29-31)",
    "attn": "full causal softmax attention",
    "swa": "sliding-window causal softmax attention",
    "trellis": "Trellis two-pass key/value slot memory (arXiv 2512.23852, reconstruction [R])",
    "msssm": "MS-SSM multi-scale selective SSM with a scale mixer (arXiv 2512.23824, reconstruction [R])",
    "selfmod": "self-modifying Titans (NL Eq. 83-88); with mlp.kind cms it is the Hope block (NL Eq. 94-97)",
}


class ModelSpec(Spec):
    """A whole language model: embedding -> n_layers blocks (pre-norm, residual) -> norm -> LM head.

    ``layout`` is repeated cyclically over ``n_layers``: ``[lmm]`` is a pure memory model, ``[lmm, swa]`` a Samba-style
    hybrid (Miras' Moneta-H/Yaad-H/Memora-H), ``[mag]`` Titans MAG.
    """

    name: str | None = None
    description: str | None = None
    vocab_size: int = Field(256, ge=2)
    d_model: int = Field(64, ge=1)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    head_dim: int | None = Field(None, ge=1, description="defaults to d_model // n_heads")
    max_seq_len: int = Field(2048, ge=1)
    layout: list[BlockKind] = Field(default_factory=lambda: ["lmm"], min_length=1)
    memory: MemorySpec = MemorySpec()
    attention: AttentionSpec = AttentionSpec()
    mac: MACSpec = MACSpec()
    trellis: TrellisSpec = TrellisSpec()
    msssm: MSSSMSpec = MSSSMSpec()
    hybrid_memory: Literal["lmm", "trellis", "msssm"] = Field(
        "lmm", description="memory of the mac/mag/mal hybrids: the lmm memory layer, a Trellis or an MS-SSM mixer")
    mlp: ChannelMLPSpec = ChannelMLPSpec()
    selfmod: SelfModSpec = SelfModSpec()
    taper: TaperSpec = TaperSpec()
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)
    budget: BudgetSpec | None = None
    train: TrainSpec | None = Field(None, description="optional default training settings (miras train)")
    tracking: TrackingSpec = TrackingSpec()

    def axes_summary(self) -> str:
        """The six axes in one token, e.g. ``mlp2·huber·decay·momentum·cosine·none`` (``attn`` for attention-only)."""
        if not self.uses_memory:
            other = "+".join(b for b in ("trellis", "msssm") if b in self.blocks)  # Trellis / MS-SSM blocks
            return f"{other or 'attn'}·—·—·—·{self.taper.kind}·—"
        a = self.memory.axes
        return "·".join([a["memory"], a["bias"], a["retention"], a["learner"], self.taper.kind, a["caching"]])

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def blocks(self) -> list[str]:
        """The block kind of every layer (layout repeated)."""
        return [self.layout[i % len(self.layout)] for i in range(self.n_layers)]

    @property
    def uses_memory(self) -> bool:
        return any(b in ("lmm", "mac", "mag", "mal", "selfmod") for b in self.blocks)

    @model_validator(mode="after")
    def _cross_check(self) -> ModelSpec:
        errors = []
        if self.head_dim is None and self.d_model % self.n_heads:
            errors.append(
                f"n_heads: d_model must be divisible by n_heads (or set head_dim), but got d_model={self.d_model}, "
                f"n_heads={self.n_heads}"
            )
        chunk = self.memory.learner.chunk_size
        if self.uses_memory and chunk > self.max_seq_len:
            errors.append(
                f"memory.learner.chunk_size: the chunk must not be longer than the sequence, but got "
                f"chunk_size={chunk} > max_seq_len={self.max_seq_len}"
            )
        if "mac" in self.blocks and self.mac.segment_length > self.max_seq_len:
            errors.append(
                f"mac.segment_length: must be <= max_seq_len, but got segment_length={self.mac.segment_length}, "
                f"max_seq_len={self.max_seq_len}"
            )
        if self.memory.local is not None:  # TNT hierarchical memory (miras/components/tnt.py)
            other = sorted({b for b in self.blocks if b in ("mac", "selfmod")})
            if other:
                errors.append(
                    f"memory.local: TNT local memories are built into lmm, mag and mal blocks, but got layout blocks "
                    f"{other}; use layout [lmm] (or mag/mal), or drop memory.local"
                )
            if self.memory.caching.kind != "none":
                errors.append(
                    f"memory.local: TNT local memories do not combine with Memory Caching, but got "
                    f"memory.caching.kind={self.memory.caching.kind!r}; use caching.kind: none or drop memory.local"
                )
        if "selfmod" in self.blocks:  # self-modifying Titans (hope): memories read the heads of x directly
            if self.n_heads * self.d_head != self.d_model:
                errors.append(
                    f"head_dim: a selfmod block splits x into heads (its memories read x_t, NL Eq. 86), so n_heads * "
                    f"head_dim must equal d_model, but got n_heads={self.n_heads}, head_dim={self.d_head}, "
                    f"d_model={self.d_model}"
                )
            if self.selfmod.chunk_size > self.max_seq_len:
                errors.append(
                    f"selfmod.chunk_size: the chunk must not be longer than the sequence, but got "
                    f"chunk_size={self.selfmod.chunk_size} > max_seq_len={self.max_seq_len}"
                )
            if self.memory.caching.kind != "none" or self.memory.feature_map.kind != "identity":
                errors.append(
                    "memory.feature_map: a selfmod block generates k with the memory M_k (NL Eq. 86); feature maps "
                    f"and caching are not defined for it, but got feature_map={self.memory.feature_map.kind!r}"
                )
        errors += _caching_errors(self)
        errors += _trellis_msssm_errors(self)
        if self.taper.kind != "uniform" and self.mlp.kind == "none":
            errors.append(f"taper.kind: a {self.taper.kind!r} taper needs a channel MLP, but got mlp.kind='none'")
        if errors:
            raise ValueError("\n".join(errors))
        return self

    # ------------------------------------------------------------------------------------------------ helpers
    def to_yaml(self) -> str:
        """YAML text of the full resolved spec; ``load_spec(s.to_yaml()) == s`` exactly."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of the resolved architecture (keys leaderboard rows).

        ``name``, ``description``, ``train`` and ``tracking`` are left out: they do not change the model. Fields at
        their default are left out too, so a new schema option (with a default) keeps every existing hash.
        """
        skip = {"name", "description", "train", "tracking"}
        data = _prune_defaults(self.model_dump(mode="json", exclude=skip), ModelSpec().model_dump(mode="json", exclude=skip))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, overrides: Mapping[str, Any] | list[str]) -> ModelSpec:
        """A new validated spec with dotted overrides applied (``{"memory.bias.p": 3}`` or ``["memory.bias.p=3"]``)."""
        data = self.model_dump(mode="json")
        return _validate(apply_overrides(data, overrides), source=self.name or "spec")


def _caching_errors(spec: ModelSpec) -> list[str]:
    """Cross-field checks of ``memory.caching`` against the model (Memory Caching needs the sequence length)."""
    cache = spec.memory.caching
    if cache.kind == "none" or not spec.uses_memory:
        return []
    errors = []
    other = sorted({b for b in spec.blocks if b in ("mac", "selfmod")})
    if other:
        errors.append(
            f"memory.caching.kind: Memory Caching wraps the memory of lmm, mag and mal blocks, but got {other} in "
            f"layout={spec.layout} with caching.kind={cache.kind!r}; use caching.kind: none with these blocks"
        )
    if cache.segment_length > spec.max_seq_len:
        errors.append(
            f"memory.caching.segment_length: a segment must not be longer than the sequence, but got "
            f"segment_length={cache.segment_length} > max_seq_len={spec.max_seq_len}"
        )
    elif cache.kind == "sparse_selective":
        n_cached = len(cache.segment_bounds(spec.max_seq_len)) - 1
        if cache.top_k > n_cached:
            errors.append(
                f"memory.caching.top_k: must be <= the number of cached segments at max_seq_len ({n_cached} with "
                f"{cache.segmentation} segments of {cache.segment_length} in {spec.max_seq_len} tokens), but got "
                f"top_k={cache.top_k}"
            )
    return errors


def _prune_defaults(full: Any, default: Any) -> Any:
    """``full`` without the entries equal to ``default`` at the same path; a section whose ``kind`` differs from the
    default's is kept whole, and ``kind`` itself is always kept (so two axes never hash alike)."""
    if not (isinstance(full, dict) and isinstance(default, dict)) or full.get("kind") != default.get("kind"):
        return full
    out = {}
    for key, value in full.items():
        if key == "kind":
            out[key] = value
        elif key not in default:
            out[key] = value
        elif isinstance(value, dict) and isinstance(default[key], dict):
            pruned = _prune_defaults(value, default[key])
            if pruned != {} and not (set(pruned) == {"kind"} and value.get("kind") == default[key].get("kind")):
                out[key] = pruned
        elif value != default[key]:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------- loading helpers

REPO_ROOT = Path(__file__).resolve().parent.parent


def recipe_dirs() -> list[Path]:
    """Where named recipes are looked up: ./recipes, then the recipes/ folder next to the installed package."""
    dirs = [Path.cwd() / "recipes", REPO_ROOT / "recipes"]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def list_recipes() -> dict[str, Path]:
    """All named recipes: name -> path."""
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return found


def find_recipe(name: str) -> Path:
    recipes = list_recipes()
    if name in recipes:
        return recipes[name]
    import difflib

    near = difflib.get_close_matches(name, list(recipes), n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise SpecError(f"base: unknown recipe {name!r}.{hint} Available: {', '.join(sorted(recipes)) or '(none found)'}.")


def parse_value(text: str) -> Any:
    """Parse the right-hand side of ``--set a.b=VALUE`` as YAML (numbers, bools, lists, strings)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | list[str] | None) -> dict[str, Any]:
    """Apply dotted overrides to a plain dict (a copy is returned). ``a.b=1`` strings are parsed as YAML values."""
    data = copy.deepcopy(data)
    if not overrides:
        return data
    if not isinstance(overrides, Mapping):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise SpecError(f"--set: expected PATH=VALUE (e.g. memory.bias.p=3), but got {item!r}")
            key, _, value = item.partition("=")
            pairs[key.strip()] = parse_value(value)
        overrides = pairs
    for path, value in overrides.items():
        node = data
        keys = path.split(".")
        for i, key in enumerate(keys[:-1]):
            nxt = node.get(key) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[key] = nxt
            elif not isinstance(nxt, dict):
                raise SpecError(f"{'.'.join(keys[: i + 1])}: cannot set {path!r}: this field is not a section")
            node = nxt
        last = keys[-1]
        # switching the kind of an axis drops the options of the old kind
        if last == "kind" and isinstance(node.get("kind"), str) and node.get("kind") != value:
            for k in [k for k in node if k != "kind"]:
                del node[k]
        node[last] = value
    return data


def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursively; a section whose ``kind`` changes is replaced, not merged."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, dict):
            if "kind" in value and old.get("kind") != value["kind"]:
                out[key] = copy.deepcopy(dict(value))
            else:
                out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _data_path(data: Any, loc: tuple[Any, ...]) -> list[str]:
    """The error location as a path through the user's data.

    pydantic puts union tags (``lp``) and validator names into ``loc``; an intermediate entry that is not a key of the
    user's data is such a tag and is dropped (an unknown or missing key is always the last entry).
    """
    out: list[str] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part in node:
            node = node[part]
            out.append(str(part))
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            out.append(f"{out.pop()}[{part}]" if out else f"[{part}]")
        elif last or not isinstance(node, dict):
            out.append(str(part))
            node = None
    return out


def _format_validation_error(err: ValidationError, source: str, data: Any = None) -> str:
    lines = []
    for e in err.errors(include_url=False):
        loc = ".".join(_data_path(data, e["loc"]))
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        # cross-field messages start with a path relative to the section that raised them
        parts = msg.split("\n")
        if all(re.match(r"^[a-z_]+(\.[a-z_]+)*(\[\d+\])?: ", m) for m in parts):
            prefix = f"{loc}." if loc else ""
            for m in parts[:-1]:
                lines.append(f"  {prefix}{m}")
            head, _, msg = parts[-1].partition(": ")
            loc = f"{prefix}{head}"
        typ = e["type"]
        if typ == "extra_forbidden":
            msg = "unknown key (not a field of this section); check the spelling or `miras show` for the fields"
        shown = e.get("input")
        if typ not in ("missing", "value_error", "model_type") and not isinstance(shown, dict):
            msg = f"{msg} (got {shown!r})"
        lines.append(f"  {loc or '<root>'}: {msg}")
    return f"{source}: invalid spec ({len(lines)} error{'s' if len(lines) > 1 else ''}):\n" + "\n".join(lines)


def _validate(data: Any, source: str) -> ModelSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a mapping of fields, but got {type(data).__name__}")
    try:
        return ModelSpec.model_validate(data)
    except NotImplementedYet:
        raise
    except ValidationError as err:
        # NotImplementedYet raised inside a validator arrives wrapped; surface it as itself
        for e in err.errors(include_url=False):
            ctx = e.get("ctx") or {}
            if isinstance(ctx.get("error"), NotImplementedYet):
                loc = ".".join(str(p) for p in e["loc"])
                raise NotImplementedYet(f"{source}: {loc + '.' if loc else ''}{ctx['error']}") from None
        raise SpecError(_format_validation_error(err, source, data)) from None


def _resolve_bases(data: dict[str, Any], source: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise SpecError(f"{source}: base: must be a recipe name (e.g. titans-lmm), but got {base!r}")
    if base in seen:
        raise SpecError(f"{source}: base: recipes inherit in a cycle: {' -> '.join(seen + (base,))}")
    path = find_recipe(base)
    parent = _read_yaml(path.read_text(), str(path))
    parent = _resolve_bases(parent, str(path), seen + (base,))
    merged = deep_merge(parent, data)
    if "name" not in data:
        merged.pop("name", None)
        merged.pop("description", None)
    return merged


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(f"{source}: malformed YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping of fields, but got {type(data).__name__}")
    return data


def load_spec(
    source: str | Path | Mapping[str, Any] | ModelSpec,
    overrides: Mapping[str, Any] | list[str] | None = None,
) -> ModelSpec:
    """Load and validate a model spec.

    ``source`` is a path to a YAML file, a recipe name (``titans-lmm``), YAML text, a dict, or a ModelSpec.
    A ``base: <recipe>`` key inherits that recipe and deep-merges the rest on top. ``overrides`` are dotted
    ``path=value`` settings applied last (as ``--set`` on the command line).

    Raises:
        SpecError: with every invalid field path, the bad value and what is allowed.
    """
    if isinstance(source, ModelSpec):
        return source.with_overrides(overrides) if overrides else source
    if isinstance(source, Mapping):
        data, name = copy.deepcopy(dict(source)), "spec"
    else:
        text = str(source)
        path = Path(text)
        is_pathlike = isinstance(source, Path) or text.endswith((".yaml", ".yml")) or ("\n" not in text and "/" in text)
        if is_pathlike:
            if not path.is_file():
                raise SpecError(f"{text}: spec file not found")
            data, name = _read_yaml(path.read_text(), text), text
        elif "\n" not in text and ":" not in text and text.strip():
            path = find_recipe(text.strip())
            data, name = _read_yaml(path.read_text(), str(path)), str(path)
        else:
            data, name = _read_yaml(text, "<yaml>"), "<yaml>"
    data = _resolve_bases(data, name)
    data = apply_overrides(data, overrides)
    return _validate(data, name)


def validate_spec_file(path: str | Path) -> ModelSpec:
    """``load_spec`` for a path only (used by ``miras validate``)."""
    return load_spec(Path(path))
