"""miras: declarative architecture search for sequence models that learn to memorize at test time.

    spec = miras.load_spec("recipes/titans-lmm.yaml", ["memory.bias.kind=huber"])
    model = miras.build(spec)                       # a torch.nn.Module (MirasLM)
    o, state = miras.memory_scan(spec.memory, q, k, v, gates)

Importing ``miras`` (or ``miras.spec``) does not import torch: the torch-backed names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from miras.errors import KernelUnavailable, MirasError, NotImplementedYet, RegistryError, SpecError
from miras.spec import MemorySpec, ModelSpec, list_recipes, load_spec, register_spec

__version__ = "0.1.0"

_LAZY = {
    "build": "miras.compiler",
    "MirasLM": "miras.model",
    "memory_scan": "miras.ops",
    "memory_read": "miras.ops",
    "count_params": "miras.params",
    "state_size_bytes": "miras.params",
    "solve_budget": "miras.params",
    "breakdown": "miras.params",
}

__all__ = [
    "KernelUnavailable",
    "MemorySpec",
    "MirasError",
    "ModelSpec",
    "NotImplementedYet",
    "RegistryError",
    "SpecError",
    "list_recipes",
    "load_spec",
    "register_spec",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'miras' has no attribute {name!r}")
