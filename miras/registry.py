"""Registries: one per axis, mapping a YAML ``kind`` to the class that implements it.

Built-in components register themselves in ``miras/components/``. A third party registers its own the same way::

    from miras.registry import BIAS

    @BIAS.register("cauchy")
    class CauchyBias(Bias):
        ...

and adds a spec class for its options with :func:`miras.spec_extension.register_spec` (see README, "Extending").
Registering a name twice is an error, never a silent overwrite.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from miras.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps ``kind`` strings to implementations for one axis."""

    def __init__(self, axis: str) -> None:
        self.axis = axis
        self._entries: dict[str, T] = {}

    def register(self, kind: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if kind in self._entries:
                raise RegistryError(f"{self.axis} kind {kind!r} is already registered; pick another name.")
            self._entries[kind] = obj
            return obj

        return add

    def get(self, kind: str) -> T:
        if kind not in self._entries:
            near = difflib.get_close_matches(kind, list(self._entries), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise RegistryError(
                f"Unknown {self.axis} kind {kind!r}.{hint} Available: {', '.join(sorted(self._entries))}."
            )
        return self._entries[kind]

    def kinds(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, kind: str) -> bool:
        return kind in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.axis!r}, kinds={self.kinds()})"


MEMORY: Registry = Registry("memory")
FEATURE_MAP: Registry = Registry("feature_map")
BIAS: Registry = Registry("bias")
RETENTION: Registry = Registry("retention")
LEARNER: Registry = Registry("learner")
BLOCK: Registry = Registry("block")
