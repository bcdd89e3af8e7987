"""Suite-wide set-up. test.sh runs the suite on one pytest-xdist worker per CPU: each worker's torch then takes its
share of the CPUs (two workers of two threads each on two cores would oversubscribe them)."""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch  # (does not import triton: the kernel tests set TRITON_INTERPRET before they import it)

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
