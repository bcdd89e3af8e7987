"""``miras compare``: train several recipes at one parameter budget on one task, several seeds each, and rank them.

Every recipe is resized by the budget solver (same knob, same tolerance), trained with identical settings per seed,
and the run records become one leaderboard row per recipe with mean ± std over seeds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from miras.errors import MirasError, SpecError
from miras.leaderboard import Leaderboard, Row, from_runs, rank_rows
from miras.search.space import train_spec_from
from miras.spec import load_spec

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "b": 1_000_000_000}


def parse_count(text: str | int) -> int:
    """``2M`` -> 2_000_000, ``150k`` -> 150_000, ``1.5e5`` -> 150_000.

    Raises:
        MirasError: not a positive count.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbB]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise MirasError(f"--budget: must be a positive parameter count such as 150k, 2M or 1.5e5, but got {text!r}.")
    return int(round(float(m.group(1)) * _SUFFIX[m.group(2).lower()]))


def run_compare(
    recipes: list[str],
    *,
    task: str | dict[str, Any],
    budget: int | None,
    tolerance: float = 0.05,
    knob: str = "d_model",
    seeds: int = 1,
    train: dict[str, Any] | None = None,
    runs_dir: str | Path = "runs/compare",
    objectives: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> Leaderboard:
    """Train each recipe at the budget for ``seeds`` seeds; recipes the budget cannot fit get a failed row."""
    from miras.params import count_params, solve_budget
    from miras.train import train as train_fn

    runs_dir = Path(runs_dir)
    failed: list[Row] = []
    stems = [Path(r).stem if r.endswith((".yaml", ".yml")) else r for r in recipes]
    if len(set(stems)) != len(stems):
        raise MirasError(f"compare: recipe names must differ (they name the run folders), but got {stems}.")
    for recipe, stem in zip(recipes, stems):
        try:
            spec = load_spec(recipe)
            if budget is not None:
                data = spec.model_dump(mode="json")
                data["budget"] = {"params": budget, "tolerance": tolerance, "knob": knob}
                spec = solve_budget(load_spec(data))
        except SpecError as err:
            log(f"{stem}: skipped: {err}")
            failed.append(Row(id=stem, status="infeasible", error=str(err)))
            continue
        log(f"{stem}: {count_params(spec):,} parameters")
        for seed in range(seeds):
            cfg = train_spec_from({**(train or {}), "task": task, "seed": seed})
            record = train_fn(spec, cfg, run_dir=runs_dir / stem / f"seed{seed}", progress=False)
            final = record.get("final") or {}
            shown = ", ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, (int, float)))
            log(f"{stem} seed {seed}: {record.get('status')} {shown}")
    if not any(runs_dir.rglob("record.json")):
        raise MirasError("compare: no recipe could be trained at this budget; see the messages above.")
    lb = from_runs(runs_dir, objectives, title=f"compare on {task if isinstance(task, str) else task.get('name')}")
    if budget is not None:
        lb.budget = {"params": budget, "tolerance": tolerance, "knob": knob}
    lb.rows = rank_rows(lb.rows + failed, lb.objectives)
    return lb
