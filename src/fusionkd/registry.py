"""A small name -> factory registry shared by datasets, models and methods.

A registry of one of the plug-in kinds (``method``, ``model``, ``dataset``) also owns the discovery of its
Python entry-point group (:data:`ENTRY_POINT_GROUPS`): the group's entry points are imported once, on the
first lookup (``names()``, ``get()``, ``entry()``, ``entries()``, ``in``), never at import time, and always
after the built-in entries registered themselves (registering is not a lookup), so those keep their names.
An entry point that fails to load is logged and recorded in :data:`ENTRY_POINT_ERRORS`, never fatal.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import logging
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import PluginError, UnknownNameError

T = TypeVar("T")

log = logging.getLogger("fusionkd")

#: the entry-point group each kind of registry loads (``fusionkd list`` shows where every entry came from)
ENTRY_POINT_GROUPS = {"method": "fusionkd.methods", "model": "fusionkd.models", "dataset": "fusionkd.datasets"}
#: entry points that could not be loaded: ``(group, name, error)``, in the order they were tried
ENTRY_POINT_ERRORS: list[tuple[str, str, str]] = []
#: every registry made, for marking where the entries an entry point or a plug-in file registered came from
_ALL: weakref.WeakSet[Registry] = weakref.WeakSet()

#: ``adopt(name, obj, doc)``: registers an entry point that names an object (not a module) under ``name``
Adopter = Callable[[str, Any, str], None]
#: ``resolve(name) -> (obj, description, extras)``: an entry for a name of a resolver's prefix that is not
#: registered (e.g. ``timm:resnet18``); raises :class:`UnknownNameError` for a name it cannot serve
Resolver = Callable[[str], tuple[Any, str, dict[str, Any]]]


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str
    extras: dict[str, Any]


def snapshot() -> dict[Registry, set[str]]:
    """The names in every registry now (without starting any discovery)."""
    return {reg: set(reg._entries) for reg in list(_ALL)}


def mark_new(before: dict[Registry, set[str]], source: str) -> list[str]:
    """Set ``extras["source"]`` of every entry registered since ``before`` (``"<kind> <name>"`` of each)."""
    new = []
    for reg, names in before.items():
        for name, entry in list(reg._entries.items()):
            if name not in names:
                entry.extras.setdefault("source", source)
                new.append(f"{reg.kind} {name}")
    return new


def exit_text(e: SystemExit) -> str:
    return f"called sys.exit({e.code!r}) while being imported (a plug-in must only define and register)"


class Registry(Generic[T]):
    """Maps names to objects (factories, classes) with a one-line description each.

    Args:
        kind: what the registry holds, used in error messages ("model", "dataset", "method").
        group: the entry-point group it loads on first lookup; default: the kind's in
            :data:`ENTRY_POINT_GROUPS` (none for other kinds).
        adopt: registers an entry point that names an object rather than a module (see :meth:`adopt_with`).
    """

    def __init__(self, kind: str, group: str | None = None, adopt: Adopter | None = None) -> None:
        self.kind = kind
        self.group = group or ENTRY_POINT_GROUPS.get(kind)
        self._adopt = adopt
        self._entries: dict[str, Entry[T]] = {}
        self._resolvers: dict[str, Resolver] = {}
        self._discovered = self.group is None
        _ALL.add(self)

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

    def add_resolver(self, prefix: str, resolve: Resolver) -> None:
        """Serve names that start with ``prefix`` (e.g. ``"timm:"``) and are not registered: on their first
        lookup, ``resolve(name)`` gives ``(obj, description, extras)``, registered under that exact name (so
        configs, checkpoints and resumes name it like any other entry), or raises :class:`UnknownNameError`.
        Nothing is resolved before such a name is looked up."""
        if not prefix:
            raise ValueError("a resolver needs a non-empty prefix")
        self._resolvers[prefix] = resolve

    def resolver_prefixes(self) -> list[str]:
        return list(self._resolvers)

    def _resolve(self, name: object) -> None:
        if not isinstance(name, str) or name in self._entries:
            return
        for prefix, resolve in self._resolvers.items():
            if name.startswith(prefix):
                obj, description, extras = resolve(name)
                extras = {"source": f"resolver {prefix}", **extras}
                self._entries[name] = Entry(name, obj, description, extras)
                return

    def entry(self, name: str) -> Entry[T]:
        self.discover()
        self._resolve(name)
        if name not in self._entries:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            more = f", or {' / '.join(p + 'NAME' for p in self._resolvers)}" if self._resolvers else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Accepted {self.kind}s: {', '.join(self.names())}{more}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self.discover()
        return list(self._entries)

    def entries(self) -> list[Entry[T]]:
        self.discover()
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        self.discover()
        try:
            self._resolve(name)
        except UnknownNameError:
            return False
        return name in self._entries

    # ------------------------------------------------------------------ entry points
    def adopt_with(self, adopt: Adopter) -> None:
        """How an entry point of this registry's group that names an object (a class, a factory) is
        registered: ``adopt(name, obj, doc)`` checks the object and registers it under ``name``."""
        self._adopt = adopt

    def discover(self, force: bool = False) -> None:
        """Import every entry point of this registry's group (once; ``force``: again)."""
        if self.group is None or (self._discovered and not force):
            return
        self._discovered = True
        for e in self._entries.values():
            e.extras.setdefault("source", "fusionkd")
        for ep in importlib.metadata.entry_points(group=self.group):
            dist = getattr(ep, "dist", None)
            source = f"entry point {dist.name} {dist.version} ({ep.value})" if dist else f"entry point ({ep.value})"
            before = snapshot()
            try:
                try:
                    obj = ep.load()
                except SystemExit as e:  # not an Exception, but as broken: reported, never the end of fusionkd
                    raise PluginError(exit_text(e)) from None
                if not isinstance(obj, types.ModuleType):
                    self._adopt_object(ep.name, obj)
            except Exception as e:  # noqa: BLE001 - a broken plug-in must not break fusionkd
                ENTRY_POINT_ERRORS.append((self.group, ep.name, f"{type(e).__name__}: {e}"))
                log.warning("plug-in %s (%s, %s) could not be loaded: %s: %s", ep.name, self.group, source,
                            type(e).__name__, e)
                continue
            mark_new(before, source)

    def _adopt_object(self, name: str, obj: Any) -> None:
        if self._adopt is None:
            raise PluginError(f"entry point {name!r} of {self.group} must name a module whose {self.kind}s use "
                              f"@register_{self.kind}")
        self._adopt(name, obj, (inspect.getdoc(obj) or "").split("\n", 1)[0])
