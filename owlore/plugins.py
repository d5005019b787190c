"""What the method and memory-option registries share: names looked up lazily (a built-in entry names the module
that exports it), entries registered at run time, and the modules that register them from outside owlore."""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import Any

RUNTIME = "<registered at run time>"
"""``Registry.modules`` value of an entry added with ``register``."""


class Registry:
    """Entries by name: ``modules[name]`` is the module whose ``attr`` (e.g. ``METHOD``) is the entry, imported on
    first use, or ``RUNTIME`` for one added with ``register``. ``kind`` / ``plural`` name them in messages."""

    def __init__(self, modules: dict[str, str], *, attr: str, kind: str, plural: str) -> None:
        self.modules, self.attr, self.kind, self.plural = modules, attr, kind, plural
        self._runtime: dict[str, Any] = {}

    def register(self, entry: Any) -> Any:
        """Add ``entry`` (its ``name`` must not be a built-in's); returns it."""
        if entry.name in self.modules and self.modules[entry.name] != RUNTIME:
            raise ValueError(f"{self.kind} {entry.name!r} is already registered ({self.modules[entry.name]})")
        self.modules[entry.name] = RUNTIME
        self._runtime[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry added with ``register``."""
        if self.modules.get(name) == RUNTIME:
            del self.modules[name]
            self._runtime.pop(name, None)

    def get(self, name: str) -> Any:
        if name not in self.modules:
            raise KeyError(f"unknown {self.kind} {name!r}; {self.plural}: {', '.join(self.modules)}")
        if self.modules[name] == RUNTIME:
            return self._runtime[name]
        return getattr(importlib.import_module(self.modules[name]), self.attr)

    def all(self) -> dict[str, Any]:
        return {name: self.get(name) for name in self.modules}


def load_plugins(env: str, group: str) -> None:
    """Import the modules named (comma-separated) in ``$env`` and the installed packages' ``group`` entry points.

    Child processes (the benchmark's ``train.py`` runs) inherit the variable, so they see the same plugins.
    """
    for name in filter(None, (m.strip() for m in os.environ.get(env, "").split(","))):
        importlib.import_module(name)
    for ep in entry_points(group=group):
        ep.load()
