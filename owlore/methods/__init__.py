"""Training methods, one module each, looked up by the config's ``method:`` key.

Adding a method: write ``owlore/methods/<name>.py`` exporting ``METHOD = Method(...)`` (see ``base.py``: its
``build``, its config sections, and what it supports) and add one line below; or ``register(Method(...))`` from
your own code (in a module named by ``$OWLORE_METHODS``, or a package's ``owlore.methods`` entry point, so that
``train.py`` processes started by the benchmark see it too). ``train.py``, the config checks, the memory estimator and ``eval/bench.py`` read the registry and the
``Method``'s fields; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable

from owlore.methods.base import BuildContext, MemoryProfile, Method, MethodParts, OptimizerConfig
from owlore.plugins import Registry, load_plugins

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
_METHODS = Registry(REGISTRY, attr="METHOD", kind="method", plural="methods")


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a method defined outside ``owlore/methods/``); returns it.

    Everything that reads the registry sees it: the config loader (``method: <name>``), ``train.py``, the memory
    estimator, ``eval/bench.py --methods``.
    """
    return _METHODS.register(method)


def unregister(name: str) -> None:
    """Remove a method added with ``register``."""
    _METHODS.unregister(name)


def get_method(name: str) -> Method:
    """The registered ``Method`` called ``name``."""
    return _METHODS.get(name)


def all_methods() -> dict[str, Method]:
    return _METHODS.all()


def names_where(test: Callable[[Method], bool]) -> list[str]:
    """Registered method names whose ``Method`` passes ``test`` (e.g. ``lambda m: m.fsdp2``), in registry order."""
    return [name for name, m in all_methods().items() if test(m)]


def listed_where(test: Callable[[Method], bool]) -> str:
    """``names_where(test)`` as one comma-separated string, for messages."""
    return ", ".join(names_where(test))


PLUGINS_ENV = "OWLORE_METHODS"
ENTRY_POINT_GROUP = "owlore.methods"


load_plugins(PLUGINS_ENV, ENTRY_POINT_GROUP)

__all__ = ["REGISTRY", "BuildContext", "MemoryProfile", "Method", "MethodParts", "OptimizerConfig", "all_methods", "get_method",
           "listed_where", "names_where", "register", "unregister"]
