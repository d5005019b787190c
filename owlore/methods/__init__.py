"""Training methods, one module each, looked up by the config's ``method:`` key.

Adding a method: write ``owlore/methods/<name>.py`` exporting ``METHOD = Method(...)`` (see ``base.py``: its
``build``, its config sections, and what it supports) and add one line below; or ``register(Method(...))`` from
your own code (in a module named by ``$OWLORE_METHODS``, or a package's ``owlore.methods`` entry point, so that
``train.py`` processes started by the benchmark see it too). ``train.py``, the config checks, the memory estimator and ``eval/bench.py`` read the registry and the
``Method``'s fields; nothing else changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from owlore.methods.base import BuildContext, MemoryProfile, Method, MethodParts, OptimizerConfig
from owlore.plugins import load_plugins

_RUNTIME = "<registered at run time>"
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


_REGISTERED: dict[str, Method] = {}
"""Methods registered at run time (``register``), e.g. from a user's script or a test."""


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a method defined outside ``owlore/methods/``); returns it.

    Everything that reads the registry sees it: the config loader (``method: <name>``), ``train.py``, the memory
    estimator, ``eval/bench.py --methods``.
    """
    if method.name in REGISTRY and REGISTRY[method.name] != _RUNTIME:
        raise ValueError(f"method {method.name!r} is already registered ({REGISTRY[method.name]})")
    REGISTRY[method.name] = _RUNTIME
    _REGISTERED[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method added with ``register``."""
    if REGISTRY.get(name) == _RUNTIME:
        del REGISTRY[name]
        _REGISTERED.pop(name, None)


def get_method(name: str) -> Method:
    """The registered ``Method`` called ``name``."""
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; methods: {', '.join(REGISTRY)}")
    if REGISTRY[name] == _RUNTIME:
        return _REGISTERED[name]
    return importlib.import_module(REGISTRY[name]).METHOD


def all_methods() -> dict[str, Method]:
    return {name: get_method(name) for name in REGISTRY}


def names_where(test: Callable[[Method], bool]) -> list[str]:
    """Registered method names whose ``Method`` passes ``test`` (e.g. ``lambda m: m.fsdp2``), in registry order."""
    return [name for name, m in all_methods().items() if test(m)]


PLUGINS_ENV = "OWLORE_METHODS"
ENTRY_POINT_GROUP = "owlore.methods"


load_plugins(PLUGINS_ENV, ENTRY_POINT_GROUP)

__all__ = ["REGISTRY", "BuildContext", "MemoryProfile", "Method", "MethodParts", "OptimizerConfig", "all_methods", "get_method",
           "names_where", "register", "unregister"]
