"""Leaderboards from run folders and `miras compare`: seeds averaged, budgets respected, Pareto fronts right."""

from __future__ import annotations

import itertools
import json
import random
import statistics

import pytest
from click.testing import CliRunner

from miras.cli import cli
from miras.leaderboard import FORMATS, axes_summary, from_runs, pareto_mask, render
from miras.search.compare import parse_count
from miras.spec import load_spec


def _dominates(a, b, signs):
    return all(s * x >= s * y for s, x, y in zip(signs, a, b)) and any(s * x > s * y for s, x, y in zip(signs, a, b))


def test_pareto_mask_matches_the_definition():
    rng = random.Random(0)
    for _ in range(20):
        pts = [[rng.choice([0.1, 0.2, 0.3, 0.5]), rng.choice([1.0, 2.0, 3.0])] for _ in range(8)]
        dirs = ["maximize", "minimize"]
        signs = [1, -1]
        expect = [not any(_dominates(q, p, signs) for j, q in enumerate(pts) if j != i) for i, p in enumerate(pts)]
        assert pareto_mask(pts, dirs) == expect


def test_axes_summary_names_the_six_axes():
    spec = load_spec("titans-lmm", ["taper.kind=cosine", "memory.bias.kind=huber"]).model_dump(mode="json")
    assert axes_summary(spec) == "mlp2·huber·decay·momentum·cosine·none"
    hybrid = load_spec("titans-mag").model_dump(mode="json")
    assert axes_summary(hybrid).endswith("[mag]")


@pytest.mark.parametrize("text, n", [("2M", 2_000_000), ("150k", 150_000), ("1.5e5", 150_000), ("40000", 40_000)])
def test_parse_count(text, n):
    assert parse_count(text) == n


def test_compare_trains_each_recipe_at_the_budget_over_seeds(tmp_path):
    runs = tmp_path / "cmp"
    out = CliRunner().invoke(cli, [
        "compare", "recipes/deltanet.yaml", "recipes/gated-deltanet.yaml", "--task", "mqar", "--budget", "60k",
        "--tolerance", "0.1", "--seeds", "2", "--steps", "4", "--batch-size", "8", "--seq-len", "32", "--lr", "3e-3",
        "--runs-dir", str(runs), "--format", "json",
    ])
    assert out.exit_code == 0, out.output
    table = json.loads(out.output[out.output.index("{"):])
    rows = {r["id"]: r for r in table["rows"]}
    assert set(rows) == {"deltanet", "gated-deltanet"}
    for name, row in rows.items():
        assert row["seeds"] == 2 and abs(row["params"] - 60_000) <= 6_000
        records = [json.loads((runs / name / f"seed{s}" / "record.json").read_text()) for s in range(2)]
        accs = [r["final"]["accuracy"] for r in records]
        assert row["values"]["accuracy"] == pytest.approx(statistics.fmean(accs))
        assert row["stds"]["accuracy"] == pytest.approx(statistics.stdev(accs))
        assert {r["train"]["seed"] for r in records} == {0, 1}
    ranked = sorted(rows.values(), key=lambda r: r["rank"])
    assert ranked[0]["values"]["accuracy"] >= ranked[1]["values"]["accuracy"]
    lb = from_runs(runs)
    for fmt, (a, b) in itertools.product(FORMATS, [("deltanet", "gated-deltanet")]):
        text = render(lb, fmt)
        assert a in text and b in text, fmt
    # every run record says which implementation ran its memory: the chunked path on this CPU, where the
    # leaderboard leaves the path column out (nothing to tell apart) but its CSV keeps the field
    assert {r["memory_path"] for r in records} == {"chunked"}
    assert " path " not in render(lb, "table") and ",memory_path," in render(lb, "csv")


def test_leaderboard_shows_the_memory_path_when_runs_differ(tmp_path):
    """A study where some runs took the Triton kernels and others the chunked path (a GPU study over a space with
    kernel gaps) gets a path column, so that tokens/s is read against it. The records are written as a GPU run
    writes them (``memory_path`` from ``miras.params.memory_path``): this CPU cannot run a kernel for real."""
    for name, path in [("a", "triton"), ("b", "chunked: no Triton kernel for retention.kind='kl'")]:
        (tmp_path / name).mkdir()
        record = {"name": name, "status": "completed", "spec_hash": name, "task": "mqar", "final": {"accuracy": 0.5},
                  "tokens_per_s": 1000.0, "memory_path": path}
        (tmp_path / name / "record.json").write_text(json.dumps(record))
    lb = from_runs(tmp_path)
    md = render(lb, "md")
    assert "| path |" in md and "| triton |" in md and "| chunked |" in md
    rows = {r["id"]: r for r in json.loads(render(lb, "json"))["rows"]}
    assert rows["b"]["memory_path"] == "chunked: no Triton kernel for retention.kind='kl'"


def test_compare_reports_an_impossible_budget(tmp_path):
    out = CliRunner().invoke(cli, ["compare", "recipes/deltanet.yaml", "--budget", "10", "--steps", "2",
                                   "--runs-dir", str(tmp_path / "x")])
    assert out.exit_code != 0
    assert "deltanet: skipped" in out.output and "no recipe could be trained" in str(out.exception or out.output)
