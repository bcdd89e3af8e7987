"""A tiny real study end to end (real trainer, real models): reproducibility, conditions, budgets, failures, leaderboards."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from miras.cli import cli
from miras.leaderboard import FORMATS, from_study, in_budget, render
from miras.params import count_params
from miras.search import load_space, load_trial, run_search, study_counts
from miras.search.runner import create_study
from miras.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "search_spaces" / "tiny.yaml"
N_TRIALS = 5  # 3 enqueued (one infeasible, one diverging, one good) + 2 sampled


def _space_dict() -> dict:
    data = yaml.safe_load(TINY.read_text())
    data["name"] = "tiny"
    # a 100k-token embedding cannot fit a 20k budget at any d_model; init_std 1e30 makes the loss overflow to NaN
    data["params"]["vocab_size"] = {"choices": [64, 100000]}
    data["params"]["init_std"] = {"choices": [0.02, 1.0e30]}
    data["n_trials"] = N_TRIALS
    return data


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    space, base = load_space(_space_dict())
    study = create_study(space, study_name="tiny", runs_dir=runs)
    common = {"memory.memory.kind": "linear", "memory.bias.kind": "l2", "memory.retention.kind": "decay",
              "memory.learner.kind": "gd", "taper.kind": "uniform"}
    study.enqueue_trial({**common, "vocab_size": 100000, "init_std": 0.02})
    study.enqueue_trial({**common, "vocab_size": 64, "init_std": 1.0e30})
    study.enqueue_trial({**common, "memory.memory.kind": "mlp", "memory.memory.depth": 1, "memory.bias.kind": "lp",
                         "memory.bias.p": 3.0, "vocab_size": 64, "init_std": 0.02})
    lines: list[str] = []
    study = run_search(space, base, study_name="tiny", runs_dir=runs, log=lines.append)
    return study, space, runs, lines


def test_study_holds_exactly_the_requested_trials(study_run):
    study, _, _, lines = study_run
    counts = study_counts(study)
    assert counts["finished"] == N_TRIALS and counts["running"] == 0 and counts["waiting"] == 0
    assert len(study.trials) == N_TRIALS
    assert counts["complete"] >= 1
    assert len(lines) == N_TRIALS and lines[-1].startswith(f"[{N_TRIALS}/{N_TRIALS}]")


def test_infeasible_budget_is_recorded_and_search_goes_on(study_run):
    study = study_run[0]
    t = study.trials[0]
    assert t.state == TrialState.FAIL and t.user_attrs["status"] == "infeasible"
    assert "budget" in t.user_attrs["error"] and "20000" in t.user_attrs["error"].replace(",", "")
    assert study.trials[2].state == TrialState.COMPLETE


def test_trial_that_diverges_is_recorded_with_its_error(study_run):
    study = study_run[0]
    t = study.trials[1]
    assert t.state == TrialState.FAIL and t.user_attrs["status"] == "diverged"
    assert "NaN" in t.user_attrs["error"]
    assert t.user_attrs["record"]["status"] == "diverged"


def test_conditional_parameters_appear_only_under_their_condition(study_run):
    study = study_run[0]
    for t in study.trials:
        p = t.params
        assert ("memory.memory.depth" in p) == (p["memory.memory.kind"] == "mlp")
        assert ("memory.bias.p" in p) == (p["memory.bias.kind"] == "lp")
        assert ("memory.bias.smoothing" in p) == (p["memory.bias.kind"] == "huber")
        if "spec" in t.user_attrs:  # the stored spec carries exactly the sampled values
            spec = t.user_attrs["spec"]
            assert spec["memory"]["bias"]["kind"] == p["memory.bias.kind"]
            if "memory.memory.depth" in p:
                assert spec["memory"]["memory"]["depth"] == p["memory.memory.depth"]
            if "memory.bias.p" in p:
                assert spec["memory"]["bias"]["p"] == pytest.approx(p["memory.bias.p"])


def test_every_resolved_spec_meets_the_budget(study_run):
    study, space = study_run[:2]
    b = space.budget
    solved = [t for t in study.trials if t.user_attrs.get("status") != "infeasible"]
    assert len(solved) >= 2
    for t in solved:
        n = count_params(load_spec(t.user_attrs["spec"]))
        assert n == t.user_attrs["n_params"]
        assert abs(n - b.params) <= b.tolerance * b.params
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["record"]["params"] == n  # the trainer built exactly the counted model


def test_stored_trials_retrain_to_their_stored_metrics(study_run, tmp_path):
    from miras.train import train

    study, _, runs = study_run[:3]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    t = done[0]
    spec, cfg = load_trial(f"tiny:{t.number}", runs_dir=runs)
    assert spec.spec_hash() == t.user_attrs["spec_hash"] and cfg.seed == t.user_attrs["seed"]
    record = train(spec, cfg, run_dir=tmp_path / "again", progress=False)
    stored = t.user_attrs["record"]["final"]
    for key in ("accuracy", "val_loss", "loss"):
        assert record["final"][key] == pytest.approx(stored[key], rel=1e-6, abs=1e-9), key
    assert t.values[0] == pytest.approx(record["final"]["accuracy"], abs=1e-12)


def test_leaderboard_lists_every_trial_in_every_format(study_run):
    study, space, runs = study_run[:3]
    lb = from_study(study)
    numbers = [t.number for t in study.trials]
    assert all(in_budget(lb))
    for fmt in FORMATS:
        text = render(lb, fmt)
        if fmt == "csv":
            ids = [row["id"] for row in csv.DictReader(io.StringIO(text))]
            assert sorted(ids) == sorted(f"#{n}" for n in numbers)
        elif fmt == "json":
            assert sorted(r["id"] for r in json.loads(text)["rows"]) == sorted(f"#{n}" for n in numbers)
        else:
            for n in numbers:
                assert f"#{n}" in text, (fmt, n)
    ranked = [r for r in lb.rows if r.rank is not None]
    values = [r.values["accuracy"] for r in ranked]
    assert values == sorted(values, reverse=True) and [r.rank for r in ranked] == list(range(1, len(ranked) + 1))
    # the CLI reads the study back from its folder
    out = CliRunner().invoke(cli, ["leaderboard", str(runs / "search" / "tiny"), "--format", "md"])
    assert out.exit_code == 0, out.output
    assert all(f"#{n}" in out.output for n in numbers)


def test_rerunning_resumes_without_extra_trials(study_run):
    study, space, runs = study_run[:3]
    space2, base = load_space(_space_dict())
    again = run_search(space2, base, study_name="tiny", runs_dir=runs, log=lambda s: None)
    assert len(again.trials) == N_TRIALS


def test_html_report_opens_in_headless_chromium(study_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the HTML report was not opened in a browser")
    study = study_run[0]
    html = render(from_study(study), "html")
    assert "<script src" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    path = tmp_path / "report.html"
    path.write_text(html)
    out = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=60,
    )
    assert 'data-report-ok="1"' in out.stdout, out.stderr[-2000:]
    assert "data-report-errors=" not in out.stdout
    assert all(f"#{t.number}" in out.stdout for t in study.trials)


def test_stale_running_trial_is_failed_and_requeued(tmp_path):
    from miras.search.storage import Heartbeat, fail_stale_trials, open_storage

    study = optuna.create_study(study_name="s", storage=open_storage(tmp_path / "s.journal"))
    alive, dead = study.ask(), study.ask()
    alive.suggest_int("x", 0, 9)
    dead.suggest_int("x", 0, 9)
    with Heartbeat(study, alive._trial_id, interval=0.2):
        study._storage.set_trial_user_attr(dead._trial_id, "heartbeat", 0.0)
        import time

        time.sleep(1.2)
        failed = fail_stale_trials(study, grace_period=1.0)
        assert failed == [dead.number]
        assert fail_stale_trials(study, grace_period=1.0) == []  # not retried twice
    trials = study.get_trials(deepcopy=False)
    assert trials[alive.number].state == TrialState.RUNNING
    assert trials[dead.number].state == TrialState.FAIL
    retry = [t for t in trials if t.state == TrialState.WAITING]
    assert len(retry) == 1 and retry[0].params == trials[dead.number].params
    assert retry[0].user_attrs == {"retry_of": dead.number}


@pytest.mark.parametrize("body, message", [
    ("base: {}\nparams: [\n", "malformed YAML"),
    ("base: {}\nparams:\n  memory.bais.kind: {choices: [l2]}\nn_trials: 1\n", "Did you mean 'memory.bias'"),
    ("base: {}\nparams:\n  memory.bias.kind: {choices: []}\nn_trials: 1\n", "at least one value"),
    ("base: {}\nparams:\n  memory.bias.kind: {choices: [l2, lp]}\n"
     "  memory.bias.p: {float: [2, 3], when: {memory.bias.knd: lp}}\nn_trials: 1\n",
     "condition path 'memory.bias.knd' must be a parameter of this space or a spec path"),
    ("base: {}\nparams:\n  memory.bias.kind: {choices: [l2, lp]}\n  memory.bias.p: {float: [2, 3]}\nn_trials: 1\n",
     "add `when: {memory.bias.kind: lp}`"),
    ("base: {}\nbudget: {params: 10}\nn_trials: 1\n", "cannot meet the budget"),
    ("base: {}\nobjectives: [accuracy, tokens_per_s]\npruner: {kind: median}\nn_trials: 1\n", "cannot prune multi-objective"),
])
def test_bad_search_spaces_exit_nonzero_with_a_clear_message(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    out = subprocess.run(["python", "-m", "miras", "search", str(path), "--runs-dir", str(tmp_path / "runs")],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


def test_unreachable_storage_exits_nonzero(tmp_path):
    out = subprocess.run(["python", "-m", "miras", "search", str(TINY), "--storage", "postgresql://u:secret@127.0.0.1:9/db"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 1 and "cannot open the study database" in out.stderr
    assert "secret" not in out.stderr and "Traceback" not in out.stderr


def test_metric_values_come_from_the_record():
    from miras.search import metric_value

    record = {"final": {"accuracy": 0.5, "loss": 1.0}, "tokens_per_s": 123.0, "state_bytes": 10}
    assert metric_value(record, "accuracy") == 0.5 and metric_value(record, "tokens_per_s") == 123.0
    assert metric_value(record, "state_bytes") == 10.0 and metric_value(record, "bpb") is None
    assert math.isnan(float("nan"))


def test_every_search_space_validates_and_samples_within_budget():
    from miras.errors import SpecError
    from miras.search import resolve_spec
    from miras.search.space import check_base_budget

    spaces = sorted((ROOT / "search_spaces").glob("*.yaml"))
    assert {"quickstart", "tiny", "full"} <= {p.stem for p in spaces}, spaces
    for path in spaces:
        space, base = load_space(path)
        check_base_budget(space, base)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1), directions=space.directions)
        feasible = 0
        for _ in range(15):
            trial = study.ask()
            from miras.search import suggest

            overrides = suggest(trial, space, base)
            assert set(trial.params) == set(overrides)
            try:
                spec = resolve_spec(space, base, overrides, seq_len=space.train.get("seq_len"))
            except SpecError:
                continue
            feasible += 1
            n = count_params(spec)
            assert abs(n - space.budget.params) <= space.budget.tolerance * space.budget.params, (path.name, overrides)
        assert feasible >= 10, path.name
