"""The HTML leaderboard report: one self-contained file (inline CSS, inline SVG plots, a small inline sort script).

Sections: the sortable leaderboard table, the optimisation history (objective per trial, best so far), the Pareto
front of the first two objectives (multi-objective studies), and hyperparameter importances from Optuna's
importance evaluators (needs >= 2 completed trials). No external JS, CSS or fonts, so it opens offline.
"""

from __future__ import annotations

import html
import math
import warnings
from typing import Any

from miras.leaderboard import Leaderboard, _cells, _columns, _header

W, H, PAD = 560, 300, 48

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px} .sub{color:#5b6475;font-size:13px}
table{border-collapse:collapse;font-size:12.5px;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #e3e6ec;text-align:left}
th{background:#f3f5f9;cursor:pointer;user-select:none;position:sticky;top:0} th:hover{background:#e6eaf2}
tr.pareto td{background:#fff7e0} tr.failed td,tr.infeasible td,tr.lost td{color:#a33} tr.pruned td{color:#777}
td.num{text-align:right;font-variant-numeric:tabular-nums} .plots{display:flex;flex-wrap:wrap;gap:24px}
.plot{border:1px solid #e3e6ec;border-radius:6px;padding:8px} .plot h3{font-size:13px;margin:0 0 4px}
.note{color:#5b6475;font-size:12.5px;max-width:560px}
"""

_JS = """
window.onerror=function(m){document.body.setAttribute('data-report-errors',String(m));};
(function(){
  function key(t){var s=t.replace(/,/g,'').split(' ')[0];var n=parseFloat(s);return isNaN(n)?t.toLowerCase():n;}
  document.querySelectorAll('table.lb th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var tb=th.closest('table').tBodies[0];var rows=Array.prototype.slice.call(tb.rows);
      var asc=th.getAttribute('data-dir')!=='asc';th.setAttribute('data-dir',asc?'asc':'desc');
      rows.sort(function(a,b){var x=key(a.cells[i].textContent),y=key(b.cells[i].textContent);
        if(x==='-'||x===''){return 1;} if(y==='-'||y===''){return -1;}
        if(typeof x===typeof y){return (x<y?-1:x>y?1:0)*(asc?1:-1);} return typeof x==='number'?-1:1;});
      rows.forEach(function(r){tb.appendChild(r);});
    });
  });
  document.body.setAttribute('data-report-ok','1');
})();
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _scale(lo: float, hi: float, a: float, b: float) -> Any:
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _axes(xlabel: str, ylabel: str, xs: tuple[float, float], ys: tuple[float, float]) -> str:
    parts = [f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" stroke="#888"/>',
             f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{H - PAD}" stroke="#888"/>',
             f'<text x="{(W + PAD) / 2}" y="{H - 10}" text-anchor="middle" font-size="12">{_esc(xlabel)}</text>',
             f'<text x="14" y="{(H - PAD) / 2}" text-anchor="middle" font-size="12" '
             f'transform="rotate(-90 14 {(H - PAD) / 2})">{_esc(ylabel)}</text>']
    fx, fy = _scale(*xs, PAD, W - 10), _scale(*ys, H - PAD, 10)
    for i in range(5):
        vx = xs[0] + (xs[1] - xs[0]) * i / 4
        vy = ys[0] + (ys[1] - ys[0]) * i / 4
        parts.append(f'<text x="{fx(vx):.1f}" y="{H - PAD + 14}" text-anchor="middle" font-size="10">{vx:.3g}</text>')
        parts.append(f'<text x="{PAD - 4}" y="{fy(vy) + 3:.1f}" text-anchor="end" font-size="10">{vy:.3g}</text>')
    return "".join(parts)


def _range(vals: list[float]) -> tuple[float, float]:
    lo, hi = min(vals), max(vals)
    if lo == hi:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    return lo, hi


def history_svg(points: list[tuple[int, float, str]], metric: str, direction: str) -> str:
    """Objective per trial (completed dots, pruned grey at their last report) and the best-so-far step line."""
    if not points:
        return ""
    xs, ys = _range([p[0] for p in points]), _range([p[1] for p in points])
    fx, fy = _scale(*xs, PAD, W - 10), _scale(*ys, H - PAD, 10)
    best, line = None, []
    for n, v, status in sorted(points):
        if status != "completed":
            continue
        if best is not None:
            line.append(f"{fx(n):.1f},{fy(best):.1f}")  # step: hold the old best up to this trial
        best = v if best is None else (max(best, v) if direction == "maximize" else min(best, v))
        line.append(f"{fx(n):.1f},{fy(best):.1f}")
    dots = "".join(
        f'<circle cx="{fx(n):.1f}" cy="{fy(v):.1f}" r="4" fill="{"#2f6fdf" if s == "completed" else "#aaa"}">'
        f"<title>#{n} {metric}={v:.4g} ({s})</title></circle>" for n, v, s in points)
    path = f'<polyline fill="none" stroke="#e07a00" stroke-width="2" points="{" ".join(line)}"/>' if line else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" aria-label="history">'
            f"{_axes('trial', metric, xs, ys)}{path}{dots}</svg>")


def pareto_svg(points: list[tuple[str, float, float, bool]], mx: str, my: str) -> str:
    """Scatter of two objectives with the Pareto front highlighted and connected."""
    if not points:
        return ""
    xs, ys = _range([p[1] for p in points]), _range([p[2] for p in points])
    fx, fy = _scale(*xs, PAD, W - 10), _scale(*ys, H - PAD, 10)
    front = sorted((p for p in points if p[3]), key=lambda p: p[1])
    line = " ".join(f"{fx(p[1]):.1f},{fy(p[2]):.1f}" for p in front)
    dots = "".join(
        f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="{5 if f else 4}" fill="{"#d62728" if f else "#2f6fdf"}">'
        f"<title>{_esc(i)} {mx}={x:.4g} {my}={y:.4g}</title></circle>" for i, x, y, f in points)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" aria-label="pareto">'
            f'{_axes(mx, my, xs, ys)}<polyline fill="none" stroke="#d62728" stroke-dasharray="4 3" points="{line}"/>'
            f"{dots}</svg>")


def importance_svg(importances: dict[str, float]) -> str:
    """Horizontal bars of hyperparameter importances (sum to 1)."""
    if not importances:
        return ""
    items = list(importances.items())[:12]
    row, left = 22, 230
    height = row * len(items) + 20
    top = max(importances.values()) or 1.0
    bars = []
    for i, (name, v) in enumerate(items):
        y = 10 + i * row
        w = (W - left - 60) * v / top
        bars.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end" font-size="11">{_esc(name)}</text>'
                    f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row - 8}" fill="#2f6fdf"/>'
                    f'<text x="{left + w + 4:.1f}" y="{y + 14}" font-size="11">{v:.2f}</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" role="img" aria-label="importances">' \
           f'{"".join(bars)}</svg>'


def param_importances(study: Any, index: int = 0) -> tuple[dict[str, float], str]:
    """Importances of the searched parameters for objective ``index``; ({}, reason) when they cannot be computed."""
    import optuna
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(done) < 2:
        return {}, f"needs at least 2 completed trials, but the study has {len(done)}"
    sign = -1.0 if study.directions[index].name == "MAXIMIZE" else 1.0  # the evaluator ranks for low target values
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study, evaluator=evaluator, target=lambda t: sign * t.values[index])
    except (RuntimeError, ValueError, ImportError) as err:
        return {}, f"not computable here ({type(err).__name__}: {err})"
    if not imp:
        return {}, "no parameter was sampled in every completed trial (conditional parameters are left out)"
    note = "Optuna's PED-ANOVA evaluator (handles conditional parameters); importance for reaching good values"
    return {k: float(v) for k, v in imp.items()}, note


def render_html(lb: Leaderboard) -> str:
    """The whole report as one HTML string."""
    cols = _columns(lb)
    numeric = {i for i, c in enumerate(cols) if c not in ("id", "status", "axes", "searched / error", "pareto")}
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = []
    for r in lb.rows:
        cls = "pareto" if r.pareto else r.status if r.status != "completed" else ("infeasible" if not r.feasible else "")
        tds = "".join(f'<td class="num">{_esc(c)}</td>' if i in numeric else f"<td>{_esc(c)}</td>"
                      for i, c in enumerate(_cells(lb, r)))
        body.append(f'<tr class="{cls}">{tds}</tr>')
    metric, direction = lb.objectives[0]
    plots = []
    points = []
    for r in lb.rows:
        n = int(r.id[1:]) if r.id.startswith("#") and r.id[1:].isdigit() else None
        v = r.values.get(metric)
        if n is not None and v is not None and math.isfinite(v):
            points.append((n, v, r.status))
    if lb.study is not None:
        for t in lb.study.get_trials(deepcopy=False):
            if t.state.name == "PRUNED" and t.intermediate_values:
                points.append((t.number, list(t.intermediate_values.values())[-1], "pruned"))
    if points:
        plots.append(("Optimisation history", history_svg(points, metric, direction),
                      "Blue: completed trials; grey: pruned trials at their last report; orange: best so far."))
    if len(lb.objectives) > 1:
        (mx, _), (my, _) = lb.objectives[:2]
        pts = [(r.id, r.values[mx], r.values[my], r.pareto) for r in lb.rows
               if r.values.get(mx) is not None and r.values.get(my) is not None]
        if pts:
            plots.append(("Pareto front", pareto_svg(pts, mx, my), "Red: trials on the Pareto front."))
    imp_note = "importances need an Optuna study (this leaderboard was built from run records)"
    if lb.study is not None:
        imp, imp_note = param_importances(lb.study)
        if imp:
            plots.append((f"Hyperparameter importance for {metric}", importance_svg(imp), imp_note))
    sections = "".join(f'<div class="plot"><h3>{_esc(t)}</h3>{svg}<p class="note">{_esc(n)}</p></div>'
                       for t, svg, n in plots)
    if lb.study is not None and not any(t.startswith("Hyperparameter") for t, _, _ in plots):
        sections += ('<div class="plot"><h3>Hyperparameter importance</h3>'
                     f'<p class="note">Not shown: {_esc(imp_note)}.</p></div>')
    n_done = sum(r.status == "completed" for r in lb.rows)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>miras leaderboard: {_esc(lb.title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>miras leaderboard: {_esc(_header(lb))}</h1>"
        f'<p class="sub">{len(lb.rows)} rows, {n_done} completed; objectives: '
        f"{_esc(', '.join(f'{m} ({d})' for m, d in lb.objectives))}. Click a column header to sort.</p>"
        f'<table class="lb"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        f'<h2>Plots</h2><div class="plots">{sections}</div>'
        f"<script>{_JS}</script></body></html>\n"
    )
