"""Optional Weights & Biases logging: config = the resolved spec (+ train spec), metrics per evaluation, final summary.

Off by default (``tracking.wandb: false``). ``mode: offline`` (the default when enabled) writes the run under
``<run_dir>/wandb/`` with no network; ``wandb sync`` uploads it later. Install with ``pip install 'miras[wandb]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from miras.errors import MirasError
from miras.train_spec import TrackingSpec


class Tracker:
    """No-op tracker (tracking disabled)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any], status: str) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, spec: TrackingSpec, *, run_dir: Path, name: str, config: dict[str, Any], resume: bool) -> None:
        try:
            import wandb
        except ImportError:
            raise MirasError("tracking.wandb: W&B logging needs the `wandb` package, but it is not installed. "
                             "pip install 'miras[wandb]', or turn tracking.wandb off.") from None
        self.wandb = wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=spec.project, entity=spec.entity, name=name, config=config, tags=spec.tags,
                              mode=spec.mode, dir=str(run_dir), id=_run_id(run_dir), resume="allow" if resume else None,
                              reinit="finish_previous")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def finish(self, summary: dict[str, Any], status: str) -> None:
        for k, v in summary.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "completed" else 1)


def _run_id(run_dir: Path) -> str:
    """A stable W&B run id per run folder (so ``--resume`` continues the same W&B run)."""
    f = run_dir / ".wandb_id"
    if f.is_file():
        return f.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    f.write_text(rid)
    return rid


def make_tracker(spec: TrackingSpec | None, *, run_dir: Path, name: str, config: dict[str, Any],
                 resume: bool = False) -> Tracker:
    if spec is None or not spec.wandb:
        return Tracker()
    return WandbTracker(spec, run_dir=run_dir, name=name, config=config, resume=resume)
