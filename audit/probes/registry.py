"""Probes register by name; the plan and the CLI's --probes read this registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from audit.probes.base import Probe

_REGISTRY: dict[str, type[Probe]] = {}
P = TypeVar("P", bound="type[Probe]")


def register(cls: P) -> P:
    _REGISTRY[cls.name] = cls
    return cls


def all_probes() -> dict[str, type[Probe]]:
    import audit.probes  # noqa: F401 - importing the package registers every probe module

    return dict(_REGISTRY)
