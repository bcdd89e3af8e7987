"""Leaderboards: rows from an Optuna study or a folder of run records, rendered as table, Markdown, CSV, JSON or HTML.

A row is ``{spec_hash, resolved spec, metrics}`` reduced to: rank, id, status, the six-axis summary
(``mlp2·huber·decay·momentum·cosine·none``), parameters, state bytes, each objective, tokens/s and wall time.
Runs of one spec on one task (several seeds) become one row with mean ± std. No torch here (style.md §9).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from miras.errors import MirasError

FORMATS = ("table", "md", "csv", "json", "html")
DIRECTIONS = {"accuracy": "maximize", "mad_score": "maximize", "tokens_per_s": "maximize"}  # others: minimize
TOP_LEVEL = ("tokens_per_s", "state_bytes", "params", "params_non_embedding", "wall_s", "peak_mem_bytes")


@dataclass
class Row:
    """One leaderboard line; ``values`` holds each objective (mean over seeds), ``stds`` its spread when seeds > 1."""

    id: str
    status: str
    summary: str = ""
    params: int | None = None
    state_bytes: int | None = None
    values: dict[str, float | None] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float | None = None
    wall_s: float | None = None
    rank: int | None = None
    pareto: bool = False
    feasible: bool = True
    seeds: int = 1
    search_params: dict[str, Any] = field(default_factory=dict)
    spec_hash: str | None = None
    memory_path: str | None = None  # the run record's: triton | chunked[: why no kernel runs it] | sdpa
    error: str | None = None


@dataclass
class Leaderboard:
    title: str
    objectives: list[tuple[str, str]]  # (metric, direction)
    rows: list[Row]
    budget: dict[str, Any] | None = None
    study: Any = None  # the optuna.Study when built from one (for HTML plots and importances)


def axes_summary(spec: dict[str, Any] | None) -> str:
    """The six axes of a spec dict: memory·bias·retention·learner·taper·caching (+ the layout when not pure memory)."""
    if not spec:
        return ""
    m = spec.get("memory") or {}
    mem = m.get("memory") or {}
    mem_name = f"mlp{mem.get('depth', '')}" if mem.get("kind") == "mlp" else mem.get("kind", "?")
    layout = spec.get("layout") or ["lmm"]
    parts = [mem_name, (m.get("bias") or {}).get("kind", "?"), (m.get("retention") or {}).get("kind", "?"),
             (m.get("learner") or {}).get("kind", "?"), (spec.get("taper") or {}).get("kind", "?"),
             (m.get("caching") or {}).get("kind", "?")]
    if not any(b in ("lmm", "mac", "mag", "mal") for b in layout):
        parts[:4] = ["-"] * 4
    text = "·".join(str(p) for p in parts)
    return text if layout == ["lmm"] else f"{text} [{'+'.join(layout)}]"


def _direction(metric: str) -> str:
    return DIRECTIONS.get(metric, "minimize")


def _metric(record: dict[str, Any], metric: str) -> float | None:
    value = record.get(metric) if metric in TOP_LEVEL else (record.get("final") or {}).get(metric)
    return None if value is None else float(value)


def pareto_mask(points: list[list[float]], directions: list[str]) -> list[bool]:
    """True for points no other point dominates (better or equal everywhere, strictly better somewhere)."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    scored = [[s * v for s, v in zip(signs, p)] for p in points]
    out = []
    for i, a in enumerate(scored):
        dominated = any(all(b_ >= a_ for a_, b_ in zip(a, b)) and any(b_ > a_ for a_, b_ in zip(a, b))
                        for j, b in enumerate(scored) if j != i)
        out.append(not dominated)
    return out


def rank_rows(rows: list[Row], objectives: list[tuple[str, str]]) -> list[Row]:
    """Sort: completed and feasible first, Pareto members first (multi-objective), then by the first objective."""
    metric, direction = objectives[0]
    ok = [r for r in rows if r.status == "completed" and r.values.get(metric) is not None]
    if len(objectives) > 1 and ok and not any(r.pareto for r in ok):
        for r, flag in zip(ok, pareto_mask([[r.values[m] for m, _ in objectives] for r in ok], [d for _, d in objectives])):
            r.pareto = flag
    sign = -1.0 if direction == "maximize" else 1.0
    ok.sort(key=lambda r: (not r.feasible, not r.pareto if len(objectives) > 1 else False, sign * r.values[metric]))
    for i, r in enumerate(ok, 1):
        r.rank = i
    rest = sorted((r for r in rows if r not in ok), key=lambda r: (r.status != "pruned", r.id))
    return ok + rest


# ------------------------------------------------------------------------------------------------------ sources


def from_study(study: Any) -> Leaderboard:
    """Rows for every trial of an Optuna study (surplus placeholders of parallel workers left out)."""
    from optuna.trial import TrialState

    space = study.user_attrs.get("space") or {}
    metrics = study.user_attrs.get("objectives") or [f"objective_{i}" for i in range(len(study.directions))]
    objectives = [(m, d.name.lower()) for m, d in zip(metrics, study.directions)]
    front = set()
    if len(objectives) > 1:
        try:
            front = {t.number for t in study.best_trials}
        except ValueError:
            front = set()
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("surplus"):
            continue
        default = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "pruned", TrialState.RUNNING: "running",
                   TrialState.WAITING: "waiting"}.get(t.state, "failed")
        status = (a.get("status") if t.state.is_finished() else None) or default
        if t.state == TrialState.FAIL and "error" not in a and status not in ("interrupted",):
            status = "lost"  # the worker died; the trial was re-queued
        record = a.get("record") or {}
        values: dict[str, float | None] = {m: None for m, _ in objectives}
        if t.state == TrialState.COMPLETE and t.values:
            values = {m: float(v) for (m, _), v in zip(objectives, t.values)}
        constraints = a.get("constraints")
        rows.append(Row(
            id=f"#{t.number}", status=status, summary=axes_summary(a.get("spec")), params=a.get("n_params"),
            state_bytes=a.get("state_bytes"), values=values, tokens_per_s=record.get("tokens_per_s"),
            wall_s=record.get("wall_s"), pareto=t.number in front,
            feasible=constraints is None or all(c <= 0 for c in constraints),
            search_params=dict(t.params), spec_hash=a.get("spec_hash"), memory_path=record.get("memory_path"),
            error=a.get("error"),
        ))
    return Leaderboard(study.study_name, objectives, rank_rows(rows, objectives), budget=space.get("budget"), study=study)


def from_runs(runs_dir: str | Path, objectives: list[str] | None = None, title: str | None = None) -> Leaderboard:
    """Rows from every ``record.json`` below ``runs_dir``; one row per (spec hash, task), seeds averaged."""
    root = Path(runs_dir)
    records = []
    for path in sorted(root.rglob("record.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise MirasError(f"{path}: cannot read the run record: {err}") from None
        rec["_dir"] = path.parent.relative_to(root).as_posix()
        records.append(rec)
    if not records:
        raise MirasError(f"{runs_dir}: no record.json found below this folder; give a runs folder or a study name.")
    if not objectives:
        objectives = ["accuracy"] if any("accuracy" in (r.get("final") or {}) for r in records) else ["loss"]
    objs = [(m, _direction(m)) for m in objectives]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        task = r.get("task") if isinstance(r.get("task"), str) else json.dumps(r.get("task"), sort_keys=True)
        groups.setdefault((r.get("spec_hash") or r.get("name", "?"), task), []).append(r)
    rows = []
    for runs in groups.values():
        done = [r for r in runs if r.get("status") == "completed"]
        use = done or runs
        first = use[0]
        values, stds = {}, {}
        for m, _ in objs:
            vs = [v for v in (_metric(r, m) for r in done) if v is not None and math.isfinite(v)]
            values[m] = statistics.fmean(vs) if vs else None
            if len(vs) > 1:
                stds[m] = statistics.stdev(vs)
        dirs = [r["_dir"].split("/") for r in runs]
        common = [parts[0] for parts in zip(*dirs) if len(set(parts)) == 1]
        name = "/".join(common) if len(runs) > 1 and common else runs[0]["_dir"]
        if name in ("", "."):
            name = str(first.get("name") or "run")
        tps = [r["tokens_per_s"] for r in done if r.get("tokens_per_s")]
        walls = [r["wall_s"] for r in done if r.get("wall_s")]
        rows.append(Row(
            id=str(name), status="completed" if done else str(first.get("status", "failed")),
            summary=axes_summary(first.get("spec")), params=first.get("params"), state_bytes=first.get("state_bytes"),
            values=values, stds=stds, tokens_per_s=statistics.fmean(tps) if tps else None,
            wall_s=statistics.fmean(walls) if walls else None, seeds=len(runs), spec_hash=first.get("spec_hash"),
            memory_path=first.get("memory_path"), error=None if done else first.get("error"),
        ))
    return Leaderboard(title or str(runs_dir), objs, rank_rows(rows, objs))


# ------------------------------------------------------------------------------------------------------ rendering


def _num(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "-"
    text = f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return f"{text} ± {std:.2g}" if std is not None else text


def _int(v: int | float | None) -> str:
    return "-" if v is None else f"{int(v):,}"


def _path_mode(path: str | None) -> str:
    """A memory path without its reasons: triton, chunked, pytorch, sdpa (several joined by " + " for a layout that
    mixes them), or - (a record from before paths were kept)."""
    return " + ".join(part.split(":")[0] for part in (path or "-").split(" + "))


def _shows_paths(lb: Leaderboard) -> bool:
    """Whether the rows' memory paths tell them apart (some ran on Triton kernels, others not), as on a GPU study
    where tokens/s compares kernels with the chunked PyTorch path; on a CPU (all chunked) the column is left out."""
    modes = {_path_mode(r.memory_path) for r in lb.rows if r.memory_path}
    return len(modes) > 1 or "triton" in modes


def _columns(lb: Leaderboard) -> list[str]:
    cols = ["rank", "id", "status", "axes", "params", "state_bytes"]
    cols += [f"{m} ({'max' if d == 'maximize' else 'min'})" for m, d in lb.objectives]
    cols += ["tokens/s", "wall_s"] + (["path"] if _shows_paths(lb) else [])
    if len(lb.objectives) > 1:
        cols.append("pareto")
    if any(r.seeds > 1 for r in lb.rows):
        cols.append("seeds")
    cols.append("searched / error")
    return cols


def _cells(lb: Leaderboard, r: Row) -> list[str]:
    cells = ["-" if r.rank is None else str(r.rank), r.id, r.status + ("" if r.feasible else " (infeasible)"),
             r.summary or "-", _int(r.params), _int(r.state_bytes)]
    cells += [_num(r.values.get(m), r.stds.get(m)) for m, _ in lb.objectives]
    cells += [_num(r.tokens_per_s), "-" if r.wall_s is None else f"{r.wall_s:.1f}"]
    if _shows_paths(lb):
        cells.append(_path_mode(r.memory_path))
    if len(lb.objectives) > 1:
        cells.append("*" if r.pareto else "")
    if any(x.seeds > 1 for x in lb.rows):
        cells.append(str(r.seeds))
    extra = ", ".join(f"{k}={_short(v)}" for k, v in r.search_params.items())
    if r.error:
        extra = (extra + " | " if extra else "") + short_error(r.error)
    cells.append(extra)
    return cells


def short_error(error: str, width: int = 160) -> str:
    """An error message on one line (multi-line spec errors keep their detail lines), cut to ``width``."""
    text = " ".join(line.strip() for line in error.splitlines() if line.strip())
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _header(lb: Leaderboard) -> str:
    if not lb.budget:
        return lb.title
    b = lb.budget
    return f"{lb.title} (budget {b['params']:,} params ± {b.get('tolerance', 0.05):.0%}, knob {b.get('knob', 'd_model')})"


def to_table(lb: Leaderboard, width: int = 200) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=_header(lb), show_lines=False)
    for c in _columns(lb):
        table.add_column(c, overflow="fold", no_wrap=c not in ("searched / error", "axes"))
    for r in lb.rows:
        table.add_row(*_cells(lb, r))
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(table)
    return buf.getvalue()


def to_markdown(lb: Leaderboard) -> str:
    cols = _columns(lb)
    lines = [f"### {_header(lb)}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in lb.rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(lb, r)) + " |")
    return "\n".join(lines) + "\n"


def to_records(lb: Leaderboard) -> list[dict[str, Any]]:
    """Plain dicts (JSON and CSV): every field of every row."""
    return [asdict(r) for r in lb.rows]


def to_json(lb: Leaderboard) -> str:
    return json.dumps({"title": lb.title, "objectives": lb.objectives, "budget": lb.budget, "rows": to_records(lb)},
                      indent=2, default=str)


def to_csv(lb: Leaderboard) -> str:
    keys = sorted({k for r in lb.rows for k in r.search_params})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "id", "status", "feasible", "axes", "params", "state_bytes", *[m for m, _ in lb.objectives],
                *[f"{m}_std" for m, _ in lb.objectives], "tokens_per_s", "wall_s", "pareto", "seeds", "spec_hash",
                "memory_path", *[f"param:{k}" for k in keys], "error"])
    for r in lb.rows:
        w.writerow([r.rank, r.id, r.status, r.feasible, r.summary, r.params, r.state_bytes,
                    *[r.values.get(m) for m, _ in lb.objectives], *[r.stds.get(m) for m, _ in lb.objectives],
                    r.tokens_per_s, r.wall_s, r.pareto, r.seeds, r.spec_hash, r.memory_path,
                    *[r.search_params.get(k) for k in keys],
                    short_error(r.error, 500) if r.error else ""])
    return buf.getvalue()


def render(lb: Leaderboard, fmt: str = "table") -> str:
    """The leaderboard in one of FORMATS.

    Raises:
        MirasError: unknown format.
    """
    if fmt == "table":
        return to_table(lb)
    if fmt == "md":
        return to_markdown(lb)
    if fmt == "csv":
        return to_csv(lb)
    if fmt == "json":
        return to_json(lb)
    if fmt == "html":
        from miras.report_html import render_html

        return render_html(lb)
    raise MirasError(f"--format: must be one of {', '.join(FORMATS)}, but got format={fmt!r}.")


def in_budget(lb: Leaderboard) -> list[bool]:
    """For each row with a parameter count: does it lie within the budget tolerance?"""
    if not lb.budget:
        return [True for _ in lb.rows]
    n, tol = lb.budget["params"], lb.budget.get("tolerance", 0.05)
    return [r.params is None or abs(r.params - n) <= tol * n for r in lb.rows]
