"""Architecture search over miras specs with Optuna: search-space YAML, study runner, storage (no torch at import)."""

from __future__ import annotations

from miras.search.runner import create_study, load_trial, metric_value, run_search, run_trial, study_counts
from miras.search.space import (
    METRIC_DIRECTIONS,
    ObjectiveSpec,
    ParamSpec,
    SearchSpace,
    load_space,
    resolve_spec,
    spec_path_info,
    suggest,
)
from miras.search.storage import load_study, open_storage

__all__ = [
    "METRIC_DIRECTIONS",
    "ObjectiveSpec",
    "ParamSpec",
    "SearchSpace",
    "create_study",
    "load_space",
    "load_study",
    "load_trial",
    "metric_value",
    "open_storage",
    "resolve_spec",
    "run_search",
    "run_trial",
    "spec_path_info",
    "study_counts",
    "suggest",
]
