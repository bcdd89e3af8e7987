"""Study storage: a local journal file by default, any SQLAlchemy URL (PostgreSQL, MySQL) for many machines.

Local default: ``runs/search/<study>/study.journal`` through Optuna's ``JournalFileBackend``. Its appends are guarded
by a file lock, so several worker processes on one machine can share it safely; SQLite is not used because Optuna's
FAQ advises against it for parallel workers ("database is locked", optuna#820).

Dead workers: RDB storages get Optuna's own heartbeat (``RDBStorage(heartbeat_interval, grace_period,
failed_trial_callback=RetryFailedTrialCallback)``). The journal has no built-in heartbeat, so the runner writes a
``heartbeat`` user attribute from a thread and :func:`fail_stale_trials` retries trials whose heartbeat is too old.
"""

from __future__ import annotations

import re
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from miras.errors import MirasError

HEARTBEAT_INTERVAL = 10  # seconds between heartbeats of a running trial
GRACE_PERIOD = 40  # a running trial silent for this long belongs to a dead worker
MAX_RETRY = 3


def default_storage_path(study: str, runs_dir: str | Path = "runs") -> Path:
    return Path(runs_dir) / "search" / study / "study.journal"


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def open_storage(url: str | Path, *, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                 grace_period: int = GRACE_PERIOD) -> BaseStorage:
    """A storage from ``postgresql://...`` / ``mysql://...`` / ``sqlite:///...`` URLs or a ``*.journal`` path.

    Raises:
        MirasError: the database cannot be reached, or the URL is not understood.
    """
    text = str(url)
    if "://" not in text:
        path = Path(text.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    scheme = text.split("://", 1)[0]
    if not scheme.startswith(("postgresql", "mysql", "sqlite")):
        raise MirasError(
            f"--storage: the URL scheme must be postgresql, mysql or sqlite (or give a .journal path), but got "
            f"scheme={scheme!r}."
        )
    if scheme == "postgresql":  # SQLAlchemy 2.1 defaults to psycopg 3; use whichever driver is installed
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            text = "postgresql+psycopg2://" + text.split("://", 1)[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat arguments are flagged experimental
            return RDBStorage(
                text,
                engine_kwargs={"pool_pre_ping": True} if not scheme.startswith("sqlite") else None,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=retry_trial,
            )
    except Exception as err:  # sqlalchemy/driver errors vary by backend; all mean "cannot use this database"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MirasError(
            f"--storage: cannot open the study database {redact(text)}: {reason}. Check that the server is running and "
            f"reachable, the credentials, and that the driver is installed (pip install 'miras[postgres]')."
        ) from None


def storage_url_for(study: str, storage: str | None, runs_dir: str | Path = "runs") -> str:
    return storage if storage else str(default_storage_path(study, runs_dir))


def load_study(study: str, storage: str | None = None, runs_dir: str | Path = "runs") -> optuna.Study:
    """Open an existing study by name (local journal under runs/search/<study>/ unless ``storage`` is given)."""
    url = storage_url_for(study, storage, runs_dir)
    if storage is None and not Path(url).is_file():
        found = sorted(p.parent.name for p in (Path(runs_dir) / "search").glob("*/study.journal"))
        raise MirasError(
            f"study: no local study named {study!r} (looked for {url}). Known local studies: "
            f"{', '.join(found) or '(none)'}; for a database give --storage URL."
        )
    st = open_storage(url)
    try:
        return optuna.load_study(study_name=study, storage=st)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(st)]
        raise MirasError(f"study: {study!r} is not in {redact(url)}. Studies there: {', '.join(names) or '(none)'}.") from None


# ------------------------------------------------------------------------------------------------------ heartbeat


class Heartbeat:
    """Context manager that keeps a running trial alive in the storage from a daemon thread."""

    def __init__(self, study: optuna.Study, trial_id: int, interval: float) -> None:
        self.storage, self.trial_id, self.interval = study._storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _beat(self) -> None:
        if isinstance(self.storage, RDBStorage):
            self.storage.record_heartbeat(self.trial_id)
        else:
            self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # the trial finished between two beats, or the storage hiccupped: try again later
                pass

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def fail_stale_trials(study: optuna.Study, grace_period: float) -> list[int]:
    """Fail running trials of dead workers and enqueue their retry; returns the failed trial numbers."""
    storage = study._storage
    if isinstance(storage, RDBStorage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        return sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before)
    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        start = t.datetime_start.timestamp() if t.datetime_start else now
        last = max(float(t.user_attrs.get("heartbeat", 0.0)), start)
        if now - last <= grace_period:
            continue
        try:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except Exception:  # another worker failed it first
            continue
        retry_trial(study, t)
        failed.append(t.number)
    return failed


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a fresh copy of ``trial`` (same parameters) unless one exists or it was retried MAX_RETRY times."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        return
    if any(trial.number in o.system_attrs.get("retry_history", []) for o in study.get_trials(deepcopy=False)):
        return
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"retry_of": trial.number}, system_attrs={"failed_trial": history[0], "retry_history": history},
    ))


def utcnow() -> str:
    return datetime.now(tz=timezone.utc).isoformat(timespec="seconds")
