"""Distributed search on a real PostgreSQL server: two workers on one study, one killed mid-trial.

CI (.ci/run) starts the server with scripts/ci_postgres.sh and exports MIRAS_TEST_POSTGRES_URL. Without it, the test
starts its own throw-away cluster when the PostgreSQL server binaries are installed, and skips (visibly) otherwise.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("postgres")  # (one module-wide server on a fixed port when CI gives none)
N_TRIALS = 4


def _initdb() -> str | None:
    found = shutil.which("initdb") or sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory):
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install 'miras[postgres]')")
    url = os.environ.get("MIRAS_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if _initdb() is None:
        pytest.skip("no PostgreSQL server binaries (run scripts/ci_postgres.sh, or apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="miras-pg-"))  # not under pytest's 0700 tmp: the postgres user must reach it
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres")
    env = {**os.environ, "MIRAS_PG_PORT": "54339", "MIRAS_PG_DATA": str(root / "data")}
    out = subprocess.run(["bash", "scripts/ci_postgres.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    ready = [line for line in out.stdout.splitlines() if line.startswith("PostgreSQL ready: ")]
    if out.returncode != 0 or not ready:
        pytest.skip(f"could not start a local PostgreSQL server: {(out.stderr or out.stdout).strip()[-300:]}")
    yield ready[-1].split(": ", 1)[1]
    subprocess.run(["bash", "scripts/ci_postgres.sh", "stop"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    shutil.rmtree(root, ignore_errors=True)


def _worker(space: Path, url: str, study: str, runs: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "miras", "search", str(space), "--storage", url, "--study", study, "--runs-dir", str(runs),
           "--heartbeat", "1", "--grace", "4", "--no-leaderboard"]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_workers_one_killed_mid_trial(pg_url, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from miras.search import open_storage

    data = yaml.safe_load((ROOT / "search_spaces" / "tiny.yaml").read_text())
    data.update(n_trials=N_TRIALS, pruner={"kind": "none"})
    data["train"]["steps"] = 60  # a few seconds per trial, so the kill lands mid-trial
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    study_name = f"pg-{uuid.uuid4().hex[:8]}"
    a = _worker(space, pg_url, study_name, tmp_path / "a")
    time.sleep(1.0)
    b = _worker(space, pg_url, study_name, tmp_path / "b")
    storage = open_storage(pg_url)
    killed = None
    try:
        deadline = time.time() + 180
        while killed is None and time.time() < deadline and a.poll() is None:
            try:
                study = optuna.load_study(study_name=study_name, storage=storage)
            except KeyError:
                time.sleep(0.3)
                continue
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.user_attrs.get("worker", "").endswith(f":{a.pid}") and "spec" in t.user_attrs:
                    a.send_signal(signal.SIGKILL)
                    killed = t.number
                    break
            time.sleep(0.2)
        assert killed is not None, "worker A never ran a trial: " + (a.communicate()[0] if a.poll() is not None else "")
        out_b, _ = b.communicate(timeout=300)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    assert b.returncode == 0, out_b
    a.wait()

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    lost = by_number[killed]
    assert lost.state == TrialState.FAIL and "error" not in lost.user_attrs  # detected by heartbeat, not an own error
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    assert len(retries) == 1, "the killed trial must be retried exactly once"
    assert retries[0].params == lost.params and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                or (t.state == TrialState.FAIL and "error" in t.user_attrs)]
    assert len(finished) == N_TRIALS, [(t.number, t.state.name, t.user_attrs.get("status")) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # nothing duplicated: every trial that ran to the end has its own run folder and record
    assert len({t.user_attrs["run_dir"] for t in finished if "run_dir" in t.user_attrs}) == len(
        [t for t in finished if "run_dir" in t.user_attrs])
    assert f"[{N_TRIALS}/{N_TRIALS}]" in out_b
