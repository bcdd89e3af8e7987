"""``miras search | leaderboard | compare``: architecture search with Optuna and the leaderboards of its results."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from miras.errors import MirasError

FORMAT = click.Choice(["table", "md", "csv", "json", "html"])


def _echo(text: str) -> None:
    click.echo(text)


def _write_reports(lb, study_dir: Path) -> list[Path]:
    from miras.leaderboard import render

    study_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt, name in (("html", "leaderboard.html"), ("md", "leaderboard.md"), ("json", "leaderboard.json")):
        path = study_dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(render(lb, fmt))
        tmp.replace(path)
        out.append(path)
    return out


@click.command()
@click.argument("space_file", metavar="SPACE")
@click.option("--study", "study_name", help="Study name (default: the space's name). Workers joining one study use the same.")
@click.option("--storage", help="Study database URL, e.g. postgresql://user:pw@host/db "
              "(default: runs/search/<study>/study.journal).")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--n-trials", type=int, help="Total finished trials wanted in the study (overrides the space).")
@click.option("--timeout", type=float, help="Seconds after which this worker starts no new trial (overrides the space).")
@click.option("--heartbeat", type=int, default=10, show_default=True, help="Seconds between heartbeats of a running trial.")
@click.option("--grace", type=int, default=40, show_default=True,
              help="A running trial silent this long belongs to a dead worker: it is failed and retried.")
@click.option("--format", "fmt", type=FORMAT, default="table", show_default=True, help="Leaderboard printed at the end.")
@click.option("--no-leaderboard", is_flag=True, help="Do not print the leaderboard at the end (workers).")
@click.option("--wandb", "use_wandb", is_flag=True, help="Log each trial as a W&B run tagged study:<name> (offline default).")
def search(space_file: str, study_name: str | None, storage: str | None, runs_dir: str, n_trials: int | None,
           timeout: float | None, heartbeat: int, grace: int, fmt: str, no_leaderboard: bool, use_wandb: bool) -> None:
    """Run (or resume, or join) an Optuna study over the search space SPACE (a search_spaces/*.yaml file).

    Every trial resolves its spec, solves the parameter budget, trains on the space's task and stores the resolved spec,
    seed and run record on the trial. Re-running the same command resumes the study; Ctrl-C stops cleanly.
    """
    from miras.leaderboard import from_study, render
    from miras.search import load_space, run_search
    from miras.search.space import check_base_budget

    if n_trials is not None and n_trials < 1:
        raise click.BadParameter(f"must be >= 1, but got {n_trials}", param_hint="--n-trials")
    space, base = load_space(space_file)
    check_base_budget(space, base)
    name = study_name or space.name or Path(space_file).stem
    from miras.search.storage import redact

    where = redact(storage) if storage else str(Path(runs_dir) / "search" / name / "study.journal")
    _echo(f"study {name!r} in {where}: {len(space.params)} parameters, objectives "
          f"{', '.join(f'{o.metric} ({o.resolved_direction})' for o in space.objectives)}, sampler {space.sampler.kind}, "
          f"pruner {space.pruner.kind}")
    if len(space.objectives) > 1:
        _echo("multi-objective: Optuna cannot prune these studies, so every trial runs to the end; the Pareto front is kept.")
    try:
        study = run_search(space, base, study_name=name, storage=storage, runs_dir=runs_dir, n_trials=n_trials,
                           timeout=timeout, heartbeat_interval=heartbeat, grace_period=grace, log=_echo,
                           wandb=use_wandb)
    except KeyboardInterrupt:
        click.echo(f"Interrupted: the running trial was re-queued. Run the same command again to resume study {name!r}.",
                   err=True)
        sys.exit(130)
    lb = from_study(study)
    paths = _write_reports(lb, Path(runs_dir) / "search" / name)
    if not no_leaderboard:
        _echo(render(lb, fmt))
    _echo(f"reports: {', '.join(str(p) for p in paths)}")


def _leaderboard_source(target: str, study: str | None, storage: str | None, objectives: list[str]):
    from miras.leaderboard import from_runs, from_study
    from miras.search import load_study, open_storage

    if storage:
        return from_study(load_study(study or target, storage))
    path = Path(target)
    journal = path if path.suffix == ".journal" else path / "study.journal"
    if journal.is_file():
        import optuna

        names = [s.study_name for s in optuna.get_all_study_summaries(open_storage(journal), include_best_trial=False)]
        name = study or (names[0] if len(names) == 1 else None)
        if name is None:
            raise MirasError(f"{journal}: holds studies {', '.join(names)}; choose one with --study.")
        return from_study(optuna.load_study(study_name=name, storage=open_storage(journal)))
    if path.is_dir():
        return from_runs(path, objectives or None)
    return from_study(load_study(study or target))


@click.command()
@click.argument("target", metavar="STUDY_OR_RUNS_DIR")
@click.option("--study", help="Study name, when the storage holds several.")
@click.option("--storage", help="Study database URL (postgresql://...) or journal path.")
@click.option("--format", "fmt", type=FORMAT, default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write to this file instead of the terminal.")
@click.option("--objective", "objectives", multiple=True,
              help="For a runs folder: metric(s) to rank by (default accuracy, else loss).")
def leaderboard(target: str, study: str | None, storage: str | None, fmt: str, output: str | None,
                objectives: tuple[str, ...]) -> None:
    """Rank the trials of a study (a name under runs/search/, a journal file, or --storage URL) or the runs in a folder."""
    from miras.leaderboard import render

    lb = _leaderboard_source(target, study, storage, list(objectives))
    text = render(lb, fmt)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
        _echo(f"wrote {output}")
    else:
        _echo(text)


@click.command()
@click.argument("recipes", nargs=-1, required=True)
@click.option("--task", default="mqar", show_default=True, help="mqar | mad:<name> | niah | formal:<name> | lm")
@click.option("--budget", help="Parameter budget for every recipe, e.g. 150k or 2M (solved by --knob).")
@click.option("--tolerance", type=float, default=0.05, show_default=True)
@click.option("--knob", type=click.Choice(["d_model", "mlp_expansion", "n_layers"]), default="d_model", show_default=True)
@click.option("--seeds", type=int, default=1, show_default=True, help="Seeds per recipe (mean ± std reported).")
@click.option("--steps", type=int, help="Training steps per run (default: the task's).")
@click.option("--batch-size", type=int)
@click.option("--seq-len", type=int)
@click.option("--lr", type=float)
@click.option("--runs-dir", default=None, help="Where the runs go (default runs/compare/<task>-<budget>).")
@click.option("--format", "fmt", type=FORMAT, default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False))
def compare(recipes: tuple[str, ...], task: str, budget: str | None, tolerance: float, knob: str, seeds: int,
            steps: int | None, batch_size: int | None, seq_len: int | None, lr: float | None, runs_dir: str | None,
            fmt: str, output: str | None) -> None:
    """Train each of RECIPES at the same budget and task (several seeds) and print the leaderboard."""
    from miras.leaderboard import render
    from miras.search.compare import parse_count, run_compare

    if seeds < 1:
        raise click.BadParameter(f"must be >= 1, but got {seeds}", param_hint="--seeds")
    n = parse_count(budget) if budget else None
    train = {k: v for k, v in {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr}.items()
             if v is not None}
    slug = task.replace(":", "-")
    out_dir = runs_dir or f"runs/compare/{slug}-{budget or 'native'}"
    lb = run_compare(list(recipes), task=task, budget=n, tolerance=tolerance, knob=knob, seeds=seeds, train=train,
                     runs_dir=out_dir, log=_echo)
    text = render(lb, fmt)
    if output:
        Path(output).write_text(text)
        _echo(f"wrote {output}")
    else:
        _echo(text)


def register(group: click.Group) -> None:
    group.add_command(search)
    group.add_command(leaderboard)
    group.add_command(compare)
