"""The memory options: one ``MemoryOption`` declaration each (``owlore.memory.option``), looked up here.

Adding an option: declare ``OPTION = MemoryOption(...)`` in the module that implements it and add one line to
``REGISTRY``; or ``register(MemoryOption(...))`` from your own module, named in ``$OWLORE_MEMORY_OPTIONS`` (or an
``owlore.memory_options`` entry point) so that ``train.py`` processes started by the benchmark see it too, and set
it as ``memory.<name>`` in a config. The config checks (values, conflicts, FSDP2), ``train.py`` (``apply``), the
memory estimator (``estimate`` / ``adjust``) and ``eval/bench.py`` read this registry; nothing else changes.
"""

from __future__ import annotations

import logging
from typing import Any

from owlore.memory.option import MemoryOption, OptionContext, checkpointing_on
from owlore.plugins import Registry, load_plugins

logger = logging.getLogger(__name__)

REGISTRY: dict[str, str] = {  # the order in which they are applied
    "chunked_loss": "owlore.memory.chunked_loss",
    "sparse_embedding_grad": "owlore.memory.sparse_embedding",
    "checkpointing": "owlore.memory.checkpoint_policy",
    "frozen_weights": "owlore.memory.int8_frozen",
    "offload_activations": "owlore.memory.offload_activations",
    "profile": "owlore.memory.probe",
}
_OPTIONS = Registry(REGISTRY, attr="OPTION", kind="memory option", plural="options")

PLUGINS_ENV = "OWLORE_MEMORY_OPTIONS"
ENTRY_POINT_GROUP = "owlore.memory_options"


def register(option: MemoryOption) -> MemoryOption:
    """Add an option defined outside owlore; it is then ``memory.<name>`` in every config."""
    return _OPTIONS.register(option)


def unregister(name: str) -> None:
    """Remove an option added with ``register``."""
    _OPTIONS.unregister(name)


def get_option(name: str) -> MemoryOption:
    return _OPTIONS.get(name)


def all_options() -> dict[str, MemoryOption]:
    return _OPTIONS.all()


def value(memory: Any, name: str) -> Any:
    """``memory.<name>``: a field of ``MemoryConfig``, else a plugin option's value (or its default)."""
    if hasattr(memory, name):
        return getattr(memory, name)
    return getattr(memory, "plugins", {}).get(name, get_option(name).default)


def value_problems(memory: Any, prefix: str = "memory.") -> list[str]:
    """Every option's value check (``MemoryOption.check``)."""
    out = []
    for name, option in all_options().items():
        v = value(memory, name)
        why = option.check(v) if option.check is not None else None
        if why:
            out.append(f"{prefix}{name}={v!r}: {why}")
    return out


def run_problems(ctx: OptionContext) -> list[str]:
    """What the options that are on cannot run with: their ``conflicts`` and, under FSDP2, ``fsdp2``."""
    out = []
    unsharded = []
    for name, option in all_options().items():
        v = value(ctx.memory, name)
        if not option.on(v):
            continue
        if option.conflicts is not None:
            out += option.conflicts(v, ctx)
        if ctx.parallel is not None and ctx.parallel.fsdp2 and not option.fsdp2:
            unsharded.append(f"memory.{name}={v!r}" if not isinstance(v, bool) else f"memory.{name}")
    if unsharded:
        out.append(f"parallel.fsdp2=true with {', '.join(unsharded)}: these swap or wrap the layers' weights (or "
                   "their saved tensors) and are not supported on shards yet; remove them "
                   "(memory.checkpointing=all works)")
    return out


def apply_memory_options(parts: Any, cfg: Any) -> list[Any]:
    """Apply every option that is on to ``parts`` (a ``MethodParts``) in registry order; returns the callbacks
    to add after the method's."""
    callbacks: list[Any] = []
    for name, option in all_options().items():
        v = value(cfg.memory, name)
        if option.on(v) and option.apply is not None:
            callbacks += option.apply(v, parts, cfg) or []
    return callbacks


def estimator_options(cfg: Any) -> dict[str, Any]:
    """Keywords of ``owlore.memory.plan.Options`` from every option's ``estimate``."""
    out: dict[str, Any] = {}
    for name, option in all_options().items():
        if option.estimate is not None:
            out.update(option.estimate(value(cfg.memory, name), cfg))
    return out


def adjust_estimate(estimate: Any, cfg: Any) -> None:
    """Let every option that is on and has an ``adjust`` change a finished ``MemoryEstimate``."""
    for name, option in all_options().items():
        v = value(cfg.memory, name)
        if option.on(v) and option.adjust is not None:
            option.adjust(v, estimate, cfg)


def checkpointing_enabled(cfg: Any) -> bool:
    """Whether the Trainer must enable activation checkpointing (``owlore.memory.option.checkpointing_on``)."""
    return checkpointing_on(cfg.memory, cfg.model)


load_plugins(PLUGINS_ENV, ENTRY_POINT_GROUP)
