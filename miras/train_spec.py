"""Training and tracking specs: the ``train:`` and ``tracking:`` sections of a model YAML (pydantic only, no torch).

    train:
      task: {name: mqar, options: {num_kv_pairs: 8}}   # or just ``task: mqar``
      steps: 400
      lr: 3.0e-3
      early_stop: {metric: accuracy, target: 0.99}
    tracking:
      wandb: true            # off by default; ``mode: offline`` needs no network

Fields left at ``None`` take the task's default (``miras.tasks.TASK_DEFAULTS``) when the run starts; the run record
stores the resolved values. CLI flags (``--steps``, ``--lr``, ...) override the YAML section.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TASK_NAME = re.compile(r"^(mqar|niah|lm|mad:[a-z0-9_-]+|formal:[a-z0-9_*()^-]+)$")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class TaskSpec(_Spec):
    """Which task to train on and its options (each task validates its own ``options``; see ``miras tasks``).

    ``name``: ``mqar`` | ``mad:<task>`` | ``niah`` | ``formal:<language>`` | ``lm``.
    ``difficulty``: an integer level (0 = the origin's baseline setting); each task maps it to its own knob.
    """

    name: str = "mqar"
    difficulty: int = Field(0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TASK_NAME.match(v):
            raise ValueError(
                f"task name must be one of mqar, mad:<name>, niah, formal:<name>, lm, but got name={v!r}"
            )
        return v

    @property
    def slug(self) -> str:
        """The name made safe for a folder name (``mad:selective-copying`` -> ``mad-selective-copying``)."""
        return re.sub(r"[^a-zA-Z0-9_-]+", "-", self.name).strip("-")


class EarlyStopSpec(_Spec):
    """Stop when the evaluated ``metric`` reaches ``target`` (``>=`` for mode max, ``<=`` for mode min)."""

    metric: str = "accuracy"
    target: float = 0.99
    mode: Literal["max", "min"] = "max"


class TrainSpec(_Spec):
    """One training run: AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``.

    ``batch_size`` is the global batch (all data-parallel ranks and accumulation steps together), so a run gives the
    same result on 1 or N processes. ``grad_accum`` splits it into micro-batches. ``None`` fields take task defaults.
    """

    task: TaskSpec = TaskSpec()
    steps: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=2)
    lr: float | None = Field(None, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup: int | None = Field(None, ge=0, description="warm-up steps")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    eval_every: int | None = Field(None, ge=1)
    eval_batches: int | None = Field(None, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="defaults to eval_every")
    seed: int = 0
    early_stop: EarlyStopSpec | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    kernel_graphs: Literal["auto", "off"] | int | None = Field(
        None, description="CUDA graphs for the MLP-memory kernels' backward and forward (MIRAS_KERNEL_MLP_GRAPHS; "
        "~1.5x faster fwd+bwd on an H200 with the backward's): auto (on CUDA, one graph per MLP-memory layer, "
        "unless the environment sets the variable), off, the most graphs kept, or unset (the default: the "
        "environment decides, off when unset)")

    @field_validator("kernel_graphs", mode="before")
    @classmethod
    def _check_graphs(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML reads off / on / false / true as booleans
            return "auto" if value else "off"
        if isinstance(value, int) and value < 0:
            raise ValueError(f"kernel_graphs must be auto, off or an integer >= 0, but got {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if self.batch_size is not None and self.batch_size % self.grad_accum:
            raise ValueError(
                f"grad_accum: batch_size must be divisible by grad_accum, but got batch_size={self.batch_size}, "
                f"grad_accum={self.grad_accum}"
            )
        if not re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, but got device={self.device!r}")
        return self


class TrackingSpec(_Spec):
    """Optional experiment tracking. W&B is off by default; ``mode: offline`` writes to the run folder, no network."""

    wandb: bool = False
    project: str = "miras"
    entity: str | None = None
    mode: Literal["online", "offline"] = "offline"
    tags: list[str] = Field(default_factory=list)
