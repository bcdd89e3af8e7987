"""Environment settings of the memory kernels (no Triton import, so ``miras.kernels`` can read them without it).

Every reader raises a ValueError naming the variable and the allowed values for a malformed setting; the knobs
themselves are listed in miras/kernels/__init__.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

WARPS = (1, 2, 4, 8, 16)


def launch_config(name: str, default: str | None = None) -> dict | None:
    """Launch options from the environment variable ``name`` ("warps,stages" or "warps,stages,maxnreg", e.g. "8,2"
    or "8,1,128"), else from ``default``: ``{"num_warps", "num_stages"[, "maxnreg"]}``; None when both are unset.
    maxnreg caps the registers per thread (ptx .maxnreg; fewer registers, more programs per SM, more spills).
    A malformed value is a ValueError naming the variable. (Read at every launch; parsed once per value.)"""
    value = os.environ.get(name) or default
    return dict(_parse_config(name, value)) if value else None


@cache
def _parse_config(name: str, value: str) -> dict:
    parts = [x.strip() for x in value.split(",")]
    ok = len(parts) in (2, 3) and all(x.isdigit() for x in parts)
    if not ok or int(parts[0]) not in WARPS or int(parts[1]) < 1 or (len(parts) == 3 and not 32 <= int(parts[2]) <= 255):
        raise ValueError(f"{name} must be 'warps,stages' or 'warps,stages,maxnreg' with warps in {WARPS}, stages >= 1 "
                         f"and 32 <= maxnreg <= 255, but got {name}={value!r}")
    config = {"num_warps": int(parts[0]), "num_stages": int(parts[1])}
    if len(parts) == 3:
        config["maxnreg"] = int(parts[2])
    return config


SWITCH_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def env_switch(name: str, default: bool) -> bool:
    """An on/off setting from the environment variable ``name`` (1/true/yes or 0/false/no), else ``default``."""
    value = os.environ.get(name)
    if not value:
        return default
    if value.lower() not in SWITCH_VALUES:
        raise ValueError(f"{name} must be one of 1, true, yes, 0, false, no, but got {name}={value!r}")
    return SWITCH_VALUES[value.lower()]


def env_tile(name: str, minimum: int = 16) -> int | None:
    """A tile size from the environment variable ``name`` (a power of two >= minimum), or None when it is unset."""
    value = os.environ.get(name)
    if not value:
        return None
    if not value.isdigit() or int(value) < minimum or int(value) & (int(value) - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum} (a tile of the memory kernels), but got "
                         f"{name}={value!r}")
    return int(value)


def env_int(name: str, default: int, lo: int, hi: int) -> int:
    """An integer in [lo, hi] from the environment variable ``name``, else ``default``."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or not lo <= int(value) <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi}, but got {name}={value!r}")
    return int(value)


def delta_chunk() -> int:
    """Tokens per WY block of the online delta rule, which is also the kernels' chunk there (miras/kernels/delta.py):
    ``MIRAS_KERNEL_DELTA_CHUNK`` (1..64), default 64 (fla's chunk_delta_rule's)."""
    return env_int("MIRAS_KERNEL_DELTA_CHUNK", 64, lo=1, hi=64)


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """One of ``choices`` from the environment variable ``name``, else ``default``."""
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, but got {value!r}")
    return value


def env_count_or_auto(name: str) -> int | str:
    """A count (an integer >= 0; unset: 0) or the word ``auto`` from the environment variable ``name``."""
    value = os.environ.get(name, "").strip()
    if value.lower() == "auto":
        return "auto"
    if value and not value.isdigit():
        raise ValueError(f"{name} must be an integer >= 0 or 'auto', but got {name}={value!r}")
    return int(value or 0)


@contextmanager
def temporary_env(values: dict[str, str]) -> Iterator[None]:
    """Set the environment variables of ``values`` for the duration of a ``with`` block, then put back what was
    there (the kernels read their MIRAS_KERNEL_* settings at each call)."""
    old = {n: os.environ.get(n) for n in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for n, v in old.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v
