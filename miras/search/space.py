"""Search spaces: a YAML file -> a validated :class:`SearchSpace` -> ``trial.suggest_*`` calls on spec paths.

A search space is a base recipe plus distributions keyed by dotted spec paths (style.md §10), so ``trial.params`` keys
are spec paths and leaderboards print them unchanged::

    base: titans-lmm
    params:
      memory.bias.kind: {choices: [l2, lp, huber]}
      memory.bias.p: {float: [1.5, 4.0], when: {memory.bias.kind: lp}}
    budget: {params: 150000, tolerance: 0.1, knob: d_model}
    train: {task: {name: mqar}, steps: 200}
    objectives: [{metric: accuracy, direction: maximize}]

No torch here: search workers and leaderboard scripts import this module quickly (style.md §9).
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from miras.errors import SpecError
from miras.spec import ModelSpec, apply_overrides, load_spec

# where each metric is read from a run record, and which way is better
METRIC_DIRECTIONS: dict[str, str] = {
    "accuracy": "maximize",
    "loss": "minimize",
    "val_loss": "minimize",
    "ppl": "minimize",
    "bpb": "minimize",
    "mad_score": "maximize",
    "tokens_per_s": "maximize",
    "state_bytes": "minimize",
    "params": "minimize",
    "params_non_embedding": "minimize",
    "wall_s": "minimize",
    "peak_mem_bytes": "minimize",
}
RECORD_TOP_LEVEL = ("tokens_per_s", "state_bytes", "params", "params_non_embedding", "wall_s", "peak_mem_bytes")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpec(_Strict):
    """One searched parameter: exactly one of ``choices`` (categorical), ``int: [lo, hi]`` or ``float: [lo, hi]``.

    ``log`` samples on a log scale (int/float); ``step`` discretises; ``when`` maps condition paths (earlier params of
    the space, or fixed spec paths of the base) to the value or list of values under which this parameter exists.
    """

    choices: list[Any] | None = None
    int_: tuple[int, int] | None = Field(None, alias="int")
    float_: tuple[float, float] | None = Field(None, alias="float")
    log: bool = False
    step: float | None = None
    when: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        given = [n for n, v in (("choices", self.choices), ("int", self.int_), ("float", self.float_)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"exactly one of choices / int / float must be given, but got {given or 'none'}")
        if self.choices is not None and not self.choices:
            raise ValueError("choices must list at least one value, but got choices=[]")
        bounds = self.int_ or self.float_
        if bounds is not None and not bounds[0] <= bounds[1]:
            raise ValueError(f"low <= high must hold, but got [{bounds[0]}, {bounds[1]}]")
        if self.log and bounds is not None and bounds[0] <= 0:
            raise ValueError(f"log scale needs low > 0, but got low={bounds[0]}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined; drop one")
        return self

    @property
    def kind(self) -> str:
        return "choices" if self.choices is not None else "int" if self.int_ is not None else "float"

    def grid_values(self) -> list[Any]:
        """Values for the grid sampler: choices, every int of the range (by step), or an error for floats."""
        if self.choices is not None:
            return [_encode(c) for c in self.choices]
        if self.int_ is not None:
            return list(range(self.int_[0], self.int_[1] + 1, int(self.step or 1)))
        raise SpecError("sampler.kind: grid needs categorical or int parameters, but got a float range; use choices.")


class ObjectiveSpec(_Strict):
    """An objective: a metric of the run record and its direction (default: the metric's natural one)."""

    metric: str
    direction: Literal["maximize", "minimize"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"metric": data} if isinstance(data, str) else data

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METRIC_DIRECTIONS:
            raise ValueError(f"metric must be one of {', '.join(METRIC_DIRECTIONS)}, but got metric={v!r}")
        return v

    @property
    def resolved_direction(self) -> str:
        return self.direction or METRIC_DIRECTIONS[self.metric]


class ConstraintSpec(_Strict):
    """A feasibility constraint on a record metric: ``min <= metric <= max`` (single-objective alternative to Pareto)."""

    metric: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> ConstraintSpec:
        if self.metric not in METRIC_DIRECTIONS:
            raise ValueError(f"metric must be one of {', '.join(METRIC_DIRECTIONS)}, but got metric={self.metric!r}")
        if self.min is None and self.max is None:
            raise ValueError(f"a constraint needs min and/or max, but got neither for metric={self.metric!r}")
        return self

    def violation(self, value: float | None) -> float:
        """Optuna's convention: <= 0 means satisfied; a missing value is infeasible (1.0)."""
        if value is None:
            return 1.0
        lo = self.min - value if self.min is not None else float("-inf")
        hi = value - self.max if self.max is not None else float("-inf")
        return float(max(lo, hi))


class SearchBudget(_Strict):
    """Fixed budget per trial: parameters solved by ``knob``; optional iso-state bound on recurrent-state bytes.

    ``state_bytes`` with ``state_tolerance`` None is an upper bound; with a tolerance t it is the band
    ``|state - state_bytes| <= t * state_bytes``. State is measured at ``state_seq_len`` (default: the train seq_len).
    """

    params: int = Field(ge=1)
    tolerance: float = Field(0.05, ge=0, lt=1)
    knob: Literal["d_model", "mlp_expansion", "n_layers"] = "d_model"
    state_bytes: int | None = Field(None, ge=1)
    state_tolerance: float | None = Field(None, ge=0)
    state_seq_len: int | None = Field(None, ge=1)


class SamplerSpec(_Strict):
    kind: Literal["tpe", "nsga2", "gp", "random", "grid"] = "tpe"
    n_startup_trials: int | None = Field(None, ge=0)
    population_size: int | None = Field(None, ge=2)


class PrunerSpec(_Strict):
    """Pruning of bad trials from intermediate evaluations (single-objective studies only)."""

    kind: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(3, ge=0)
    n_warmup_steps: int = Field(0, ge=0)
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)


class SearchSpace(_Strict):
    """A whole search: base recipe, parameters, budget, training settings, objectives, sampler, pruner, stop rule."""

    name: str | None = None
    description: str | None = None
    base: str | dict[str, Any]
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    budget: SearchBudget | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    objectives: Annotated[list[ObjectiveSpec], Field(min_length=1)] = [ObjectiveSpec(metric="accuracy")]
    constraints: list[ConstraintSpec] = Field(default_factory=list)
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    n_trials: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0, description="seconds; stop starting new trials after this")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _default_pruner(cls, data: Any) -> Any:
        """Multi-objective studies cannot be pruned, so their pruner defaults to none."""
        if isinstance(data, dict) and isinstance(data.get("objectives"), list) and len(data["objectives"]) > 1:
            data = {"pruner": {"kind": "none"}, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("n_trials or timeout must be given, but got neither (the search would never stop)")
        if len(self.objectives) > 1 and self.pruner.kind != "none":
            raise ValueError(
                f"pruner: Optuna cannot prune multi-objective studies, but got pruner.kind={self.pruner.kind!r} with "
                f"{len(self.objectives)} objectives; set pruner.kind: none, or keep one objective and move the others "
                f"to constraints (e.g. constraints: [{{metric: state_bytes, max: 50000}}])"
            )
        if self.sampler.kind == "gp" and len(self.objectives) > 1 and self.constraints:
            pass  # GPSampler handles both; nothing to reject
        return self

    @property
    def directions(self) -> list[str]:
        return [o.resolved_direction for o in self.objectives]


# ------------------------------------------------------------------------------------------------ spec-path checks


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes an annotation can hold (unwraps Annotated, unions, Optional)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def spec_path_info(path: str) -> dict[str, list[str]]:
    """Check that ``path`` is a field of ModelSpec; return the variant kinds it needs, e.g.
    ``spec_path_info("memory.bias.p") == {"memory.bias.kind": ["lp"]}``.

    Raises:
        SpecError: the path is not a spec field (with a did-you-mean hint).
    """
    needs: dict[str, list[str]] = {}
    models: list[type[BaseModel]] = [ModelSpec]
    keys = path.split(".")
    for i, key in enumerate(keys):
        have = [m for m in models if key in m.model_fields]
        if not have:
            names = sorted({f for m in models for f in m.model_fields})
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {'.'.join(keys[:i] + [near[0]])!r}?" if near else ""
            where = ".".join(keys[:i]) or "the model"
            raise SpecError(f"{path}: {key!r} is not a field of {where}.{hint} Fields there: {', '.join(names)}.")
        if len(have) < len(models) and key != "kind":
            kinds = [m.model_fields["kind"].default for m in have if "kind" in m.model_fields]
            needs[".".join(keys[:i] + ["kind"])] = kinds
        models = [sub for m in have for sub in _models_in(m.model_fields[key].annotation)]
        if not models and i < len(keys) - 1:
            raise SpecError(f"{path}: {'.'.join(keys[: i + 1])} is a value, not a section; it has no field {keys[i + 1]!r}.")
    return needs


def _lookup(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _encode(value: Any) -> Any:
    """Optuna categoricals hold scalars only; lists and mappings travel as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _decode(value: Any, choices: list[Any]) -> Any:
    for c in choices:
        if isinstance(c, (list, dict)) and json.dumps(c) == value:
            return c
    return value


# ------------------------------------------------------------------------------------------------------ loading


def base_spec_data(space: SearchSpace, root: Path | None = None) -> dict[str, Any]:
    """The base recipe as a plain dict (a recipe name, a path relative to the space file, or an inline mapping)."""
    if isinstance(space.base, dict):
        spec = load_spec(space.base)
    else:
        path = Path(space.base)
        if root is not None and not path.is_absolute() and (root / path).is_file():
            path = root / path
        spec = load_spec(path if path.is_file() else space.base)
    return spec.model_dump(mode="json")


def check_space(space: SearchSpace, base: dict[str, Any], source: str = "search space") -> None:
    """Cross-checks that need the spec schema: known paths, conditions on known paths, variant fields under a condition.

    Raises:
        SpecError: listing every problem found.
    """
    errors: list[str] = []
    declared: list[str] = []
    for path, param in space.params.items():
        where = f"params.{path}"
        try:
            needs = spec_path_info(path)
        except SpecError as err:
            errors.append(f"{where}: unknown spec path: {err}")
            declared.append(path)
            continue
        for cond, values in param.when.items():
            if cond in space.params and cond not in declared:
                errors.append(f"{where}.when: the condition {cond!r} must be declared before {path!r} in params")
            elif cond not in space.params:
                try:
                    spec_path_info(cond)
                except SpecError as err:
                    near = difflib.get_close_matches(cond, list(space.params), n=1)
                    hint = f" Did you mean the parameter {near[0]!r}?" if near else ""
                    errors.append(
                        f"{where}.when: condition path {cond!r} must be a parameter of this space or a spec path, "
                        f"but it is neither ({err}).{hint}"
                    )
                    continue
            cond_param = space.params.get(cond)
            if cond_param is not None and cond_param.choices is not None:
                bad = [v for v in _as_list(values) if v not in cond_param.choices]
                if bad:
                    errors.append(f"{where}.when: {cond} can only take {cond_param.choices}, but the condition asks for {bad}")
        for kind_path, kinds in needs.items():
            if kind_path in space.params:
                allowed = param.when.get(kind_path)
                if allowed is None or any(v not in kinds for v in _as_list(allowed)):
                    errors.append(
                        f"{where}: this field exists only when {kind_path} is one of {kinds}, but the parameter is not "
                        f"conditioned on that; add `when: {{{kind_path}: {kinds[0] if len(kinds) == 1 else kinds}}}`"
                    )
            elif kind_path not in param.when and _lookup(base, kind_path) not in kinds:
                errors.append(
                    f"{where}: this field exists only when {kind_path} is one of {kinds}, but the base has "
                    f"{kind_path}={_lookup(base, kind_path)!r}; search {kind_path} too or change the base"
                )
        declared.append(path)
    if space.budget is None and any(p.startswith("budget") for p in space.params):
        errors.append("params: budget fields are set by the space's budget section, not searched")
    if errors:
        plural = "s" * (len(errors) > 1)
        raise SpecError(f"{source}: invalid search space ({len(errors)} error{plural}):\n  " + "\n  ".join(errors))


def load_space(source: str | Path | dict[str, Any]) -> tuple[SearchSpace, dict[str, Any]]:
    """Read and validate a search-space YAML (path, YAML text or dict). Returns the space and its base spec as a dict.

    Raises:
        SpecError: malformed YAML, schema errors, unknown spec paths, bad conditions, an invalid base.
    """
    root = None
    if isinstance(source, dict):
        data, name = dict(source), "search space"
    else:
        path = Path(source)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            if not path.is_file():
                raise SpecError(f"{source}: search-space file not found")
            text, name, root = path.read_text(), str(path), path.parent
        else:
            text, name = str(source), "<yaml>"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise SpecError(f"{name}: malformed YAML{at}: {getattr(err, 'problem', None) or err}") from None
        if not isinstance(data, dict):
            raise SpecError(f"{name}: a search space must be a YAML mapping, but got {type(data).__name__}")
        data.setdefault("name", Path(name).stem if root is not None else None)
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors(include_url=False):
            loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key; check the spelling (see search_spaces/quickstart.yaml for the fields)"
            lines.append(f"{loc or '<root>'}: {msg}")
        plural = "s" * (len(lines) > 1)
        raise SpecError(f"{name}: invalid search space ({len(lines)} error{plural}):\n  " + "\n  ".join(lines)) from None
    base = base_spec_data(space, root)
    check_space(space, base, name)
    if space.train:
        train_spec_from(space.train, source=name)
    return space, base


def train_spec_from(data: dict[str, Any], source: str = "train") -> Any:
    """Validate the ``train:`` section with the trainer's TrainSpec (pydantic only, no torch)."""
    from miras.train_spec import TrainSpec

    try:
        return TrainSpec.model_validate(data)
    except ValidationError as err:
        lines = [f"train.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors(include_url=False)]
        raise SpecError(f"{source}: invalid train section:\n  " + "\n  ".join(lines)) from None


# ---------------------------------------------------------------------------------------------------- sampling


def suggest(trial: Any, space: SearchSpace, base: dict[str, Any]) -> dict[str, Any]:
    """Ask ``trial`` for every parameter whose condition holds; return the dotted overrides in declaration order.

    Works with any Optuna trial, including ``optuna.trial.FixedTrial``.
    """
    chosen: dict[str, Any] = {}
    for path, p in space.params.items():
        if not all(_current(cond, chosen, base) in _as_list(v) for cond, v in p.when.items()):
            continue
        if p.choices is not None:
            value = _decode(trial.suggest_categorical(path, [_encode(c) for c in p.choices]), p.choices)
        elif p.int_ is not None:
            value = trial.suggest_int(path, p.int_[0], p.int_[1], step=int(p.step or 1), log=p.log)
        else:
            value = trial.suggest_float(path, p.float_[0], p.float_[1], step=p.step, log=p.log)
        chosen[path] = value
    return chosen


def _current(path: str, chosen: dict[str, Any], base: dict[str, Any]) -> Any:
    return chosen[path] if path in chosen else _lookup(base, path)


def grid_space(space: SearchSpace) -> dict[str, list[Any]]:
    return {path: p.grid_values() for path, p in space.params.items()}


def resolve_spec(space: SearchSpace, base: dict[str, Any], overrides: dict[str, Any], *,
                 seq_len: int | None = None) -> ModelSpec:
    """The trial's spec: base + overrides, validated, budget solved, iso-state bound checked.

    Raises:
        SpecError: an invalid combination, a budget the knob cannot reach, or a state outside the iso-state band.
    """
    data = apply_overrides(base, overrides)
    if space.budget is not None:
        b = space.budget
        data["budget"] = {"params": b.params, "tolerance": b.tolerance, "knob": b.knob}
    spec = load_spec(data)
    if spec.budget is None:
        return spec
    from miras.params import solve_budget, state_size_bytes

    spec = solve_budget(spec)
    b = space.budget
    if b is not None and b.state_bytes is not None:
        length = b.state_seq_len or seq_len or spec.max_seq_len
        state = state_size_bytes(spec, length)
        if b.state_tolerance is None and state > b.state_bytes:
            raise SpecError(
                f"budget.state_bytes: the recurrent state must be <= {b.state_bytes} bytes (iso-state bound), but got "
                f"state_bytes={state} at seq_len={length}"
            )
        if b.state_tolerance is not None and abs(state - b.state_bytes) > b.state_tolerance * b.state_bytes:
            raise SpecError(
                f"budget.state_bytes: the recurrent state must lie within {b.state_tolerance:.0%} of {b.state_bytes} "
                f"bytes, but got state_bytes={state} at seq_len={length}"
            )
    return spec


def check_base_budget(space: SearchSpace, base: dict[str, Any]) -> None:
    """Fail fast when the budget cannot be met even by the base spec (before any trial starts).

    Raises:
        SpecError: naming the budget and the solver's reason.
    """
    if space.budget is None:
        return
    params_only = space.model_copy(update={"budget": space.budget.model_copy(update={"state_bytes": None})})
    try:
        resolve_spec(params_only, base, {})
    except SpecError as err:
        raise SpecError(f"budget: the base spec cannot meet the budget, so no trial could: {err}") from None
