"""One small generic, typed plugin registry.

Every swappable piece of hybridtron (mixers, FFNs, attention implementations, residual
updates, preconditioners, optimizers, schedulers, tokenizers, datasets) is looked up by name in
a ``Registry``. In-tree plugins register with a decorator::

    @RESIDUALS.register("plain")
    class PlainResidual(ResidualUpdate):
        '''x <- x + f(norm(x)): the ordinary pre-norm residual.'''

Out-of-tree packages register through Python entry points in the group
``hybridtron.<kind>`` (for example ``[project.entry-points."hybridtron.residual"]``); they are
loaded lazily the first time a registry is asked for a name it does not know, or for its list.

This module depends on nothing but the standard library: it is the one leaf that every package
(``data_pipeline`` included) may import, with the error types the CLI reports to users.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

ENTRY_POINT_PREFIX = "hybridtron."


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, corrupt checkpoint...).

    The CLI prints its message as one line and exits non-zero, without a traceback, so the
    message must name the problem and the fix.
    """

    exit_code = 1


class UsageError(UserError):
    """A command line or config file that cannot be read (missing file, malformed override)."""

    exit_code = 2


class ConfigError(UserError):
    """A config key that is unknown, of the wrong type, or has an impossible value."""

    exit_code = 2

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class RegistryError(UserError):
    """A name that is not registered, registered twice, or a plugin that failed to load."""

    exit_code = 2


class Registry(Generic[T]):
    """A named table of plugins of one kind (``T`` is what a lookup returns)."""

    # Every registry ever created, by kind: `hybridtron registry list` walks this.
    _all: dict[str, Registry] = {}

    def __init__(self, kind: str, description: str) -> None:
        if kind in Registry._all:
            raise RegistryError(f"a registry of kind {kind!r} exists already")
        self.kind = kind
        self.description = description
        self._items: dict[str, T] = {}
        self._entry_points_loaded = False
        Registry._all[kind] = self

    @property
    def entry_point_group(self) -> str:
        return ENTRY_POINT_PREFIX + self.kind

    def register(self, name: str, *, override: bool = False) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` adds the decorated object under ``name``."""

        def add(obj: T) -> T:
            self.add(name, obj, override=override)
            return obj

        return add

    def add(self, name: str, obj: T, *, override: bool = False) -> None:
        if name in self._items and not override and self._items[name] is not obj:
            raise RegistryError(
                f"{self.kind} {name!r} is registered twice; pick another name or pass override=True"
            )
        self._items[name] = obj

    def get(self, name: str) -> T:
        """The plugin called ``name``; loads entry points if it is not known yet."""
        if name not in self._items:
            self.load_entry_points()
        if name not in self._items:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())} "
                f"(or install a package that registers it under the entry-point group "
                f"{self.entry_point_group!r})"
            )
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        if name not in self._items:
            self.load_entry_points()
        return name in self._items

    def names(self) -> list[str]:
        self.load_entry_points()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self._items[name]

    def load_entry_points(self) -> None:
        """Import every plugin that installed packages declare for this kind (once)."""
        if self._entry_points_loaded:
            return
        # Marked loaded only when every plugin imported: a broken one is reported on each lookup.
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin package must name itself
                raise RegistryError(
                    f"plugin {ep.name!r} ({ep.value}) in entry-point group "
                    f"{self.entry_point_group!r} failed to import: {exc}"
                ) from exc
            # An entry point may point at the object itself or at a module that registers
            # it with the decorator on import; only the first case needs adding here.
            if not isinstance(obj, type(importlib)) and ep.name not in self._items:
                self.add(ep.name, obj)
        self._entry_points_loaded = True

    @staticmethod
    def doc_line(obj: object) -> str:
        """First line of an object's docstring: the one-line summary `registry list` prints."""
        doc = (getattr(obj, "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else "(no description)"

    @classmethod
    def all(cls) -> dict[str, Registry]:
        return dict(sorted(cls._all.items()))

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._items)})"
