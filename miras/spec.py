"""The model spec: a pydantic description of a miras language model (no torch here).

A spec is a point of the Miras design space (Behrouz et al. 2025, arXiv:2504.13173, §4) extended by the later
papers of the line. Six axes describe the memory of a layer:

    memory architecture   ``memory.memory``     linear (matrix) or deep MLP memory; ``memory.feature_map`` for q/k
    attentional bias      ``memory.bias``       the inner objective l(M; k, v): dot, l2, lp, huber (omega: later)
    retention gate        ``memory.retention``  how much of the old memory survives: none, decay, lq, kl, elastic
    learning rule         ``memory.learner``    how the inner objective updates memory: gd, momentum (muon, dgd: later)
    depth taper           ``taper``             channel-MLP width per layer: uniform, linear, cosine, reverse
    caching policy        ``memory.caching``    Memory Caching aggregations (only ``none`` is built yet)

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
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from miras.errors import NotImplementedYet, SpecError
from miras.train_spec import TrackingSpec, TrainSpec

# --------------------------------------------------------------------------------------------------------------- base


class Spec(BaseModel):
    """Base of every spec: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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
    """

    kind: Literal["identity", "polynomial"] = "identity"
    degree: int = Field(2, ge=1, le=6)
    learnable: bool = True


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
    """ATLAS Omega rule: l2 regression over a sliding window of ``window`` tokens with gates gamma (ATLAS Eq. 9)."""

    kind: Literal["omega"] = "omega"
    window: int = Field(4, ge=1)
    implemented: ClassVar[bool] = False


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
    """ATLAS Muon: momentum, then ``steps`` Newton-Schulz iterations, then gated accumulation (ATLAS Eq. 32-33)."""

    kind: Literal["muon"] = "muon"
    lr: GateSpec = Field(default_factory=_default_lr)
    momentum: GateSpec = GateSpec(init=0.9)
    steps: int = Field(5, ge=1)
    chunk_size: int = Field(16, ge=1)
    implemented: ClassVar[bool] = False


class DGDLearnerSpec(Spec):
    """Hope's delta gradient descent ``W_t = W_{t-1}(alpha_t I - eta_t k k^T) - eta_t grad`` (NL Eq. 57)."""

    kind: Literal["dgd"] = "dgd"
    lr: GateSpec = Field(default_factory=_default_lr)
    chunk_size: int = Field(16, ge=1)
    implemented: ClassVar[bool] = False


LearnerSpec = Annotated[
    GDLearnerSpec | MomentumLearnerSpec | MuonLearnerSpec | DGDLearnerSpec, Field(discriminator="kind")
]

# ---------------------------------------------------------------------------------------------------- caching policy


class CachingSpec(Spec):
    """Memory Caching (arXiv 2602.24281): cache end-of-segment memory states and aggregate their reads.

    ``none`` only for now; ``residual``, ``gated_residual``, ``soup`` and ``sparse_selective`` are accepted by the schema
    and rejected with a "not implemented yet" error.
    """

    kind: Literal["none", "residual", "gated_residual", "soup", "sparse_selective"] = "none"
    segment_length: int = Field(256, ge=1)
    segmentation: Literal["constant", "logarithmic"] = "constant"
    top_k: int = Field(2, ge=1)
    write: Literal["continue", "fresh"] = "continue"


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
        if self.caching.kind != "none":
            raise NotImplementedYet(
                f"caching.kind: {self.caching.kind!r} (Memory Caching) is not implemented yet; use caching.kind: none."
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
        for path, gate in gates.items():
            if gate is None or gate.granularity != "channel":
                continue
            if path != "retention.gate" or ret.kind not in ("decay",) or self.memory.kind != "linear":
                errors.append(
                    f"{path}.granularity: 'channel' is only supported for the decay retention gate of a linear memory "
                    f"(GLA-style key-channel decay), but got it on {path} with memory.kind={self.memory.kind!r}, "
                    f"retention.kind={ret.kind!r}; use 'head' or 'scalar'."
                )
        if ret.kind in ("kl",) and self.memory.kind == "mlp" and self.memory.norm is False and self.memory.residual:
            pass  # positive weights with residual are fine; nothing to check
        if errors:
            raise ValueError("\n".join(errors))
        return self


_IMPLEMENTED = {"bias": ["dot", "l2", "lp", "huber"], "learner": ["gd", "momentum"]}

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


class ChannelMLPSpec(Spec):
    """Channel mixer after each token mixer: ``swiglu`` (Llama), ``gelu`` (GPT) or ``none``. Width = expansion * d_model."""

    kind: Literal["swiglu", "gelu", "none"] = "swiglu"
    expansion: float = Field(4.0, gt=0)


class BudgetSpec(Spec):
    """A parameter budget: the solver adjusts ``knob`` until ``|count_params - params| <= tolerance * params``."""

    params: int = Field(ge=1)
    tolerance: float = Field(0.05, ge=0, lt=1)
    knob: Literal["d_model", "mlp_expansion", "n_layers"] = "d_model"


BlockKind = Literal["lmm", "mac", "mag", "mal", "attn", "swa"]
BLOCK_DESCRIPTIONS = {
    "lmm": "memory token mixer only (Titans LMM, Miras models, DeltaNet, ...)",
    "mac": "Titans Memory as a Context (Eq. 21-25)",
    "mag": "Titans Memory as a Gate (Eq. 26-28)",
    "mal": "Titans Memory as a Layer (Eq. 29-31)",
    "attn": "full causal softmax attention",
    "swa": "sliding-window causal softmax attention",
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
    mlp: ChannelMLPSpec = ChannelMLPSpec()
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
            return f"attn·—·—·—·{self.taper.kind}·—"
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
        return any(b in ("lmm", "mac", "mag", "mal") for b in self.blocks)

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

        ``name``, ``description``, ``train`` and ``tracking`` are left out: they do not change the model.
        """
        data = self.model_dump(mode="json", exclude={"name", "description", "train", "tracking"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, overrides: Mapping[str, Any] | list[str]) -> ModelSpec:
        """A new validated spec with dotted overrides applied (``{"memory.bias.p": 3}`` or ``["memory.bias.p=3"]``)."""
        data = self.model_dump(mode="json")
        return _validate(apply_overrides(data, overrides), source=self.name or "spec")


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
