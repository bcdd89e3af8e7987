"""The study runner behind ``miras search``: an ask/tell loop over Optuna trials that train real miras models.

Each trial: suggest parameters on spec paths -> resolve the spec and solve the budget (an infeasible trial is told
FAIL with its reason and the search goes on) -> train with intermediate reports for pruning -> tell the objectives.
Resolved spec, train settings, seed and the run record are stored as trial user attributes (and the spec/record files
as Optuna artifacts), so ``load_trial(study, n)`` rebuilds any trial exactly.

Several workers (processes or machines) run the same loop on one study. The loop counts finished trials in the
storage, so the study stops at ``n_trials`` in total; a trial started beyond that is marked ``surplus`` and skipped.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from miras.errors import MirasError, SpecError
from miras.leaderboard import short_error
from miras.search.space import RECORD_TOP_LEVEL, SearchSpace, grid_space, resolve_spec, suggest, train_spec_from
from miras.search.storage import (
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    Heartbeat,
    fail_stale_trials,
    open_storage,
    retry_trial,
    storage_url_for,
)

FINISHED_OK = (TrialState.COMPLETE, TrialState.PRUNED)


def metric_value(record: dict[str, Any], metric: str) -> float | None:
    """A metric of a run record: top-level (tokens_per_s, state_bytes, params, wall_s, ...) or from ``final``."""
    value = record.get(metric) if metric in RECORD_TOP_LEVEL else (record.get("final") or {}).get(metric)
    return None if value is None else float(value)


def make_sampler(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    s, cons = space.sampler, (_constraints_func if space.constraints else None)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if s.kind == "tpe":
        startup = s.n_startup_trials if s.n_startup_trials is not None else 5
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True,
                                          constraints_func=cons)
    if s.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=s.population_size or 8, constraints_func=cons)
    if s.kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials or 5, constraints_func=cons)
    if s.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(grid_space(space), seed=seed)


def make_pruner(space: SearchSpace, steps: int | None) -> optuna.pruners.BasePruner:
    p = space.pruner
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=steps or "auto",
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def _constraints_func(trial: FrozenTrial) -> list[float]:
    return list(trial.user_attrs.get("constraints", [1.0]))


# ------------------------------------------------------------------------------------------------------ counting


def _counted(t: FrozenTrial) -> bool:
    """A trial that used up one of the requested trials: done, pruned, or failed for a reason of its own."""
    if t.user_attrs.get("surplus"):
        return False
    return t.state in FINISHED_OK or (t.state == TrialState.FAIL and "error" in t.user_attrs)


def study_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {
        "finished": sum(_counted(t) for t in trials),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
        "waiting": sum(t.state == TrialState.WAITING for t in trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
    }


def _claimed_before(study: optuna.Study, number: int) -> int:
    return sum((_counted(t) or t.state == TrialState.RUNNING) for t in study.get_trials(deepcopy=False) if t.number < number)


# ------------------------------------------------------------------------------------------------------ the loop


@dataclass
class SearchContext:
    """Everything a trial needs besides the trial itself."""

    space: SearchSpace
    base: dict[str, Any]
    study_dir: Path
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    train_fn: Callable[..., dict[str, Any]] | None = None
    log: Callable[[str], None] = print
    durations: list[float] = field(default_factory=list)
    wandb: bool = False


def create_study(space: SearchSpace, *, study_name: str, storage: str | None = None, runs_dir: str | Path = "runs",
                 heartbeat_interval: int = HEARTBEAT_INTERVAL, grace_period: int = GRACE_PERIOD) -> optuna.Study:
    """Create the study, or join it if it exists (resume / another worker). The space is stored on the study.

    Raises:
        MirasError: the existing study was made from a different search space or other directions.
    """
    url = storage_url_for(study_name, storage, runs_dir)
    st = open_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    directions = space.directions
    try:
        existing = optuna.load_study(study_name=study_name, storage=st)
    except KeyError:
        existing = None
    n_before = len(existing.trials) if existing is not None else 0
    seed = space.seed + n_before  # a fresh single worker is reproducible; a resumed or joining one draws new points
    steps = space.train.get("steps")
    study = optuna.create_study(study_name=study_name, storage=st, directions=directions, load_if_exists=True,
                                sampler=make_sampler(space, seed), pruner=make_pruner(space, steps))
    stored = study.user_attrs.get("space")
    mine = space.model_dump(mode="json", by_alias=True)
    if stored is None:
        study.set_user_attr("space", mine)
        study.set_user_attr("objectives", [o.metric for o in space.objectives])
    elif {k: v for k, v in stored.items() if k not in ("n_trials", "timeout")} != \
            {k: v for k, v in mine.items() if k not in ("n_trials", "timeout")}:
        raise MirasError(
            f"study: {study_name!r} already exists with a different search space; resume it with the same file, or pick a "
            f"new name with --study."
        )
    return study


def run_search(
    space: SearchSpace,
    base: dict[str, Any],
    *,
    study_name: str | None = None,
    storage: str | None = None,
    runs_dir: str | Path = "runs",
    n_trials: int | None = None,
    timeout: float | None = None,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
    log: Callable[[str], None] = print,
    train_fn: Callable[..., dict[str, Any]] | None = None,
    wandb: bool = False,
) -> optuna.Study:
    """Run (or resume, or join) the study until it holds ``n_trials`` finished trials or ``timeout`` seconds pass.

    Ctrl-C stops cleanly: the running trial is marked interrupted and re-queued, so re-running the command resumes.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name or space.name or "search"
    n_trials = n_trials if n_trials is not None else space.n_trials
    timeout = timeout if timeout is not None else space.timeout
    study = create_study(space, study_name=name, storage=storage, runs_dir=runs_dir,
                         heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    study_dir = Path(runs_dir) / "search" / name
    ctx = SearchContext(space, base, study_dir, heartbeat_interval, train_fn, log, wandb=wandb)
    progress = _Progress(study, space, n_trials, timeout, log)
    start = time.time()
    while True:
        fail_stale_trials(study, grace_period)
        counts = study_counts(study)
        if n_trials is not None and counts["finished"] >= n_trials:
            break
        if timeout is not None and time.time() - start >= timeout:
            log(f"time limit of {timeout:.0f}s reached; not starting new trials")
            break
        if isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study):
            log("grid exhausted")
            break
        if n_trials is not None and counts["finished"] + counts["running"] >= n_trials and not counts["waiting"]:
            time.sleep(min(5.0, max(0.5, grace_period / 4)))  # others run the last trials; retry theirs if they die
            continue
        trial = study.ask()
        if n_trials is not None and _claimed_before(study, trial.number) >= n_trials:
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        t0 = time.time()
        run_trial(study, trial, ctx)
        ctx.durations.append(time.time() - t0)
        progress.update(trial.number, ctx.durations)
    return study


def run_trial(study: optuna.Study, trial: optuna.Trial, ctx: SearchContext) -> None:
    """Run one trial and tell the study its outcome; only KeyboardInterrupt escapes (after re-queueing the trial).

    The heartbeat stops before the tell, so no heartbeat write can land on a finished trial.
    """
    interrupted = False
    with Heartbeat(study, trial._trial_id, ctx.heartbeat_interval):
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            state, values = _run_trial(trial, ctx)
        except KeyboardInterrupt:
            state, values, interrupted = TrialState.FAIL, None, True
            trial.set_user_attr("status", "interrupted")
        except optuna.TrialPruned:
            state, values = TrialState.PRUNED, None
            trial.set_user_attr("status", "pruned")
        except SpecError as err:
            state, values = _fail(trial, "infeasible", str(err))
        except Exception as err:  # a trial that raises must not end the search: record it and go on
            tail = "".join(traceback.format_exception(type(err), err, err.__traceback__)[-3:])
            state, values = _fail(trial, "failed", f"{type(err).__name__}: {err}", tail)
    study.tell(trial, values, state=state)
    if interrupted:  # re-queue it, so that running the command again resumes with this trial
        retry_trial(study, study._storage.get_trial(trial._trial_id))
        raise KeyboardInterrupt


def _fail(trial: optuna.Trial, status: str, error: str, tb: str | None = None) -> tuple[TrialState, None]:
    trial.set_user_attr("status", status)
    trial.set_user_attr("error", error[:2000])
    if tb:
        trial.set_user_attr("traceback", tb[-4000:])
    return TrialState.FAIL, None


def _run_trial(trial: optuna.Trial, ctx: SearchContext) -> tuple[TrialState, list[float] | None]:
    space = ctx.space
    overrides = suggest(trial, space, ctx.base)
    trial.set_user_attr("overrides", overrides)
    train_data = dict(space.train)
    train_data.setdefault("seed", space.seed)
    cfg = train_spec_from(train_data)
    trial.set_user_attr("train", cfg.model_dump(mode="json"))
    trial.set_user_attr("seed", cfg.seed)
    spec = resolve_spec(space, ctx.base, overrides, seq_len=cfg.seq_len)
    from miras.params import count_params, state_size_bytes

    trial.set_user_attr("spec", spec.model_dump(mode="json"))
    trial.set_user_attr("spec_hash", spec.spec_hash())
    trial.set_user_attr("n_params", count_params(spec))
    trial.set_user_attr("state_bytes", state_size_bytes(spec, cfg.seq_len or spec.max_seq_len))

    single = len(space.objectives) == 1 and space.pruner.kind != "none"
    primary = space.objectives[0].metric

    def callback(step: int, metrics: dict[str, float]) -> None:
        if not single or primary not in metrics:
            return
        value = float(metrics[primary])
        if math.isfinite(value):
            trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {primary}={value:.4g}")

    train = ctx.train_fn
    if train is None:
        from miras.train import train
    run_dir = ctx.study_dir / "trials" / f"{trial.number:05d}"
    try:
        extra = {}
        if ctx.wandb:  # one W&B run per trial, tagged with the study (offline unless the spec's tracking says online)
            from miras.train_spec import TrackingSpec

            extra["wandb"] = TrackingSpec(wandb=True, tags=[f"study:{ctx.study_dir.name}", f"trial:{trial.number}"])
        record = train(spec, cfg, run_dir=run_dir, callback=callback, progress=False, **extra)
    except optuna.TrialPruned:
        _store_record(trial, run_dir)
        raise
    _store_record(trial, run_dir, record)
    status = record.get("status", "completed")
    if status != "completed":
        return _fail(trial, status, str(record.get("error") or f"the run ended with status {status!r}"))
    values, missing = [], []
    for o in space.objectives:
        v = metric_value(record, o.metric)
        if v is None or not math.isfinite(v):
            missing.append(o.metric)
        values.append(v)
    if missing:
        have = sorted(set(record.get("final") or {}) | {k for k in RECORD_TOP_LEVEL if k in record})
        return _fail(trial, "failed",
                     f"objectives: the run record has no finite {', '.join(missing)}; it has {', '.join(have)}")
    if space.constraints:
        trial.set_user_attr("constraints", [c.violation(metric_value(record, c.metric)) for c in space.constraints])
    trial.set_user_attr("status", "completed")
    return TrialState.COMPLETE, values


def _store_record(trial: optuna.Trial, run_dir: Path, record: dict[str, Any] | None = None) -> None:
    """Keep the run record (minus what is stored already) on the trial, and the files as artifacts."""
    import json

    trial.set_user_attr("run_dir", str(run_dir))
    path = run_dir / "record.json"
    if record is None and path.is_file():
        record = json.loads(path.read_text())
    if record is None:
        return
    slim = {k: v for k, v in record.items() if k not in ("spec", "train")}
    trial.set_user_attr("record", slim)
    try:
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        store = FileSystemArtifactStore(str(run_dir.parent.parent / "artifacts"))
        Path(store._base_path).mkdir(parents=True, exist_ok=True)
        if path.is_file():
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
    except Exception as err:  # artifacts are a convenience; the user attributes hold the same data
        trial.set_user_attr("artifact_error", str(err)[:500])


# ------------------------------------------------------------------------------------------------------ progress


class _Progress:
    """One line per finished trial: trials done, this trial's outcome, best so far and the ETA."""

    def __init__(self, study: optuna.Study, space: SearchSpace, n_trials: int | None, timeout: float | None,
                 log: Callable[[str], None]) -> None:
        self.study, self.space, self.n_trials, self.timeout, self.log = study, space, n_trials, timeout, log
        self.start = time.time()

    def update(self, number: int, durations: list[float]) -> None:
        t = self.study._storage.get_trial(self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, number))
        counts = study_counts(self.study)
        done = counts["finished"]
        metrics = self.space.objectives
        outcome = t.user_attrs.get("status", t.state.name.lower())
        if t.state == TrialState.COMPLETE:
            outcome += " " + " ".join(f"{o.metric}={v:.4g}" for o, v in zip(metrics, t.values))
        elif "error" in t.user_attrs:
            outcome += f" ({short_error(t.user_attrs['error'], 120)})"
        best = ""
        try:
            if len(metrics) == 1:
                b = self.study.best_trial
                best = f" | best #{b.number} {metrics[0].metric}={b.value:.4g}"
            else:
                best = f" | Pareto front: {len(self.study.best_trials)} trial(s)"
        except ValueError:
            pass
        elapsed = time.time() - self.start
        eta = ""
        if self.n_trials is not None and durations:
            left = max(0, self.n_trials - done) * (sum(durations) / len(durations))
            if self.timeout is not None:
                left = min(left, max(0.0, self.timeout - elapsed))
            eta = f", ETA {_fmt(left)}"
        total = f"/{self.n_trials}" if self.n_trials is not None else ""
        self.log(f"[{done}{total}] trial #{number} {outcome}{best} | {_fmt(elapsed)} elapsed{eta}")


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ------------------------------------------------------------------------------------------------ reproducibility


def load_trial(ref: str, storage: str | None = None, runs_dir: str | Path = "runs") -> tuple[Any, Any]:
    """``STUDY:N`` -> (ModelSpec, TrainSpec) of trial N exactly as it ran (for ``miras train --from-trial``).

    Raises:
        MirasError: unknown study or trial, or a trial that never resolved a spec (e.g. infeasible).
    """
    from miras.search.storage import load_study
    from miras.spec import load_spec

    study_name, sep, num = ref.rpartition(":")
    if not sep or not num.isdigit():
        raise MirasError(f"--from-trial: expected STUDY:N (e.g. quickstart:3), but got {ref!r}.")
    study = load_study(study_name, storage, runs_dir)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    t = trials.get(int(num))
    if t is None:
        raise MirasError(f"--from-trial: study {study_name!r} has trials 0..{max(trials, default=-1)}, but got N={num}.")
    if "spec" not in t.user_attrs:
        raise MirasError(
            f"--from-trial: trial {num} of {study_name!r} has no resolved spec (status "
            f"{t.user_attrs.get('status', t.state.name.lower())}: {t.user_attrs.get('error', 'no error recorded')})."
        )
    return load_spec(t.user_attrs["spec"]), train_spec_from(t.user_attrs["train"])
