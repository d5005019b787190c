"""Training methods, one module each, looked up by the config's ``method:`` key.

Adding a method: write ``owlore/methods/<name>.py`` exporting ``METHOD = Method(...)`` (see ``base.py``) and add
one line below. ``train.py``, the config loader and ``eval/compare.py`` read this table; nothing else changes.
"""

from __future__ import annotations

import importlib

from owlore.methods.base import BuildContext, Method, MethodParts, OptimizerConfig

REGISTRY: dict[str, str] = {
    "owlore": "owlore.methods.owlore",
    "full": "owlore.methods.full",
    "lora": "owlore.methods.lora",
    "qlora": "owlore.methods.qlora",
    "galore": "owlore.methods.galore",
    "lisa": "owlore.methods.lisa",
    "badam": "owlore.methods.badam",
    "apollo": "owlore.methods.apollo",
}


def get_method(name: str) -> Method:
    """The registered ``Method`` called ``name``."""
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; methods: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).METHOD


def all_methods() -> dict[str, Method]:
    return {name: get_method(name) for name in REGISTRY}


__all__ = ["REGISTRY", "BuildContext", "Method", "MethodParts", "OptimizerConfig", "all_methods", "get_method"]
