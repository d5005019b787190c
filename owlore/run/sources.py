"""Where a model comes from (a hub id, a local directory, the embedded SmolLM2), checked before anything loads.

transformers answers a local path that does not exist with "Repo id must be in the form 'repo_name'", a folder
without ``config.json`` with "Should have a `model_type` key", and a folder without weights fails in the
tokenizer converter. These checks name the real problem first; a name that is not a local path goes to the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from owlore.errors import UsageError

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json", "*.gguf",
                   "*.pt", "*.pth")


class ModelSourceError(UsageError):
    """The model named by a key or flag cannot be what it is meant to be (missing, not a checkpoint, no weights)."""


def looks_like_path(name: str) -> bool:
    """A name that can only mean a local path: absolute, ``./``, ``../``, ``~``, or more than one ``/``
    (a hub id is ``name`` or ``namespace/name``), or one that exists here."""
    return (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or Path(name).expanduser().exists())


def check_model_source(name: str, *, key: str = "model.name", adapter_ok: bool = False) -> str:
    """Return ``name`` (the embedded model's name resolved to its directory) or raise ``ModelSourceError``.

    Args:
        key: the config key or flag the name came from, for the message (``model.name``, ``--model``).
        adapter_ok: a peft adapter directory (``adapter_config.json``, no ``config.json``) is acceptable.
    """
    from owlore.assets import resolve_model_name

    resolved = resolve_model_name(name)
    if not looks_like_path(resolved):
        return resolved  # a hub id: the hub (or its cache) answers
    path = Path(resolved).expanduser()
    if not path.exists():
        raise ModelSourceError(f"{key}={name!r}: no such file or directory. Give an existing save_pretrained "
                               "directory, a hub id (namespace/name), or smollm2-135m-instruct")
    if path.is_file():
        if path.name == "config.json":
            return resolved
        raise ModelSourceError(f"{key}={name!r}: is a file; give the directory that holds config.json and the weights")
    if not (path / "config.json").is_file():
        if adapter_ok and (path / "adapter_config.json").is_file():
            return resolved
        what = " or adapter_config.json" if adapter_ok else ""
        raise ModelSourceError(f"{key}={name!r}: the directory has no config.json{what}, so it is not a "
                               "save_pretrained checkpoint (a training output_dir keeps its model in final/)")
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ModelSourceError(f"{key}={name!r}: has config.json but no weights (*.safetensors or "
                               "pytorch_model*.bin); was save_pretrained interrupted? Save the model again or "
                               "point at the full checkpoint")
    return resolved
