"""A small name -> factory registry shared by datasets, models and methods."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str
    extras: dict[str, Any]


class Registry(Generic[T]):
    """Maps names to objects (factories, classes) with a one-line description each.

    Args:
        kind: what the registry holds, used in error messages ("model", "dataset", "method").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str = "", **extras: Any) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("resnet20", "CIFAR ResNet-20, 0.27 M params")``."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, description, dict(extras))
            return obj

        return deco

    def replace(self, name: str, obj: T, description: str = "", **extras: Any) -> T:
        """Register ``obj`` under ``name``, replacing an earlier entry of that name (run-time registrations,
        e.g. a user's model object)."""
        self._entries[name] = Entry(name, obj, description, dict(extras))
        return obj

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Accepted {self.kind}s: {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry[T]]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries
