"""Modules that register methods or memory options from outside owlore, imported when a registry loads."""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points


def load_plugins(env: str, group: str) -> None:
    """Import the modules named (comma-separated) in ``$env`` and the installed packages' ``group`` entry points.

    Child processes (the benchmark's ``train.py`` runs) inherit the variable, so they see the same plugins.
    """
    for name in filter(None, (m.strip() for m in os.environ.get(env, "").split(","))):
        importlib.import_module(name)
    for ep in entry_points(group=group):
        ep.load()
