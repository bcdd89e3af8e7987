"""The exception tree of miras, rooted at :class:`MirasError`."""

from __future__ import annotations


class MirasError(Exception):
    """Base class of every error miras raises on purpose."""


class SpecError(MirasError, ValueError):
    """A model spec (YAML, dict or override) is invalid. The message names each field path."""


class RegistryError(MirasError, KeyError):
    """An unknown or duplicate component name in a registry."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class NotImplementedYet(SpecError):
    """The spec asks for an option the schema knows but miras does not build yet."""


class KernelUnavailable(MirasError, ImportError):
    """A fused kernel was requested where it cannot run (no Triton, no CUDA, unsupported combination)."""
