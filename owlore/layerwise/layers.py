"""Find the decoder blocks of a causal LM, and switch whole blocks between trainable and frozen.

Replaces the official OwLore/LISA code's ``eval("self." + layers_attribute)`` lookup and its per-class table
(pixeli99/OwLore ``finetuner.py``) with one ordered search over the attribute paths HF models use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Tried in order, on the model and on every wrapper found by ``_unwrap`` (PeftModel, LLaVA, DDP ...).
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi, (Llava)ForCausalLM.model -> *Model
    "layers",  # *Model (base), LLaVA language_model
    "model.language_model.layers",  # LlavaForConditionalGeneration (transformers 5.x)
    "language_model.layers",  # LlavaModel
    "language_model.model.layers",  # LLaVA (transformers 4.x)
    "transformer.h",  # GPT-2, GPT-J, Bloom (transformer.h)
    "h",  # GPT2Model
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "decoder.layers",  # OPTModel
)
# Attributes that wrap the real model: peft (base_model.model), DDP/FSDP (module), compiled (_orig_mod).
_WRAPPERS: tuple[str, ...] = ("base_model", "model", "module", "_orig_mod")


def _get_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _candidates(model: nn.Module) -> list[nn.Module]:
    """The model and the modules it wraps (breadth-first, each once)."""
    seen: list[nn.Module] = []
    queue = [model]
    while queue:
        m = queue.pop(0)
        if any(m is s for s in seen):
            continue
        seen.append(m)
        for attr in _WRAPPERS:
            inner = getattr(m, attr, None)
            if isinstance(inner, nn.Module):
                queue.append(inner)
    return seen


def find_decoder_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """Return the ``nn.ModuleList`` of decoder blocks of a causal LM.

    Works for Llama, Mistral, Qwen2, Gemma, GPT-2, GPT-NeoX, OPT and Phi, and for those models inside a peft
    ``PeftModel`` or as the language model of a LLaVA model.

    Args:
        model: the model (or a wrapper around it).
        path: explicit dotted attribute path (e.g. ``"model.layers"``), tried on the model and its wrappers.

    Raises:
        ValueError: no ``ModuleList`` was found; the message lists every path that was tried.
    """
    paths = (path,) if path else LAYER_PATHS
    for candidate in _candidates(model):
        for p in paths:
            found = _get_path(candidate, p)
            if isinstance(found, nn.ModuleList) and len(found) > 0:
                return found
    raise ValueError(
        f"Could not find the decoder layers of {type(model).__name__}: looked for an nn.ModuleList at "
        f"{', '.join(paths)} on the model and on its wrappers ({', '.join(_WRAPPERS)}). "
        "Pass the attribute path explicitly (e.g. `layers_path='model.layers'`)."
    )


def set_layers_trainable(
    layers: nn.ModuleList,
    active: Iterable[int],
    *,
    param_filter: Sequence[str] | None = None,
    param_ids: set[int] | None = None,
) -> int:
    """Make exactly the blocks in ``active`` trainable and freeze every other block.

    Args:
        layers: the decoder blocks.
        active: indices of blocks to train.
        param_filter: if given, only parameters whose name contains one of these substrings are unfrozen in the
            active blocks (e.g. ``["lora_"]`` to train only LoRA weights of sampled layers).

    Returns:
        The number of trainable parameters inside decoder blocks after the change.
    """
    active = set(active)
    bad = [i for i in active if not 0 <= i < len(layers)]
    if bad:
        raise IndexError(f"layer indices {sorted(bad)} out of range for {len(layers)} decoder layers")
    n = 0
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            on = (i in active and (param_filter is None or any(s in name for s in param_filter))
                  and (param_ids is None or id(p) in param_ids))
            p.requires_grad_(on)
            if on:
                n += p.numel()
    return n


def active_layer_indices(layers: nn.ModuleList) -> list[int]:
    """Indices of blocks with at least one trainable parameter."""
    return [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]


def linear_modules(module: nn.Module, *, exclude: tuple[str, ...] = ("lora_",)) -> list[tuple[str, nn.Module]]:
    """All ``nn.Linear``-like modules (anything with a 2-D ``weight`` used as ``x @ W.T``) inside ``module``.

    Includes ``nn.Linear`` and its subclasses (e.g. bitsandbytes ``Linear4bit``) and GPT-2's ``Conv1D`` (which
    stores the weight transposed: ``x @ W``); callers check ``is_conv1d`` to orient the weight. Modules whose name
    contains one of ``exclude`` are skipped: by default peft's LoRA adapters, which are not base weights (their
    ``base_layer`` is kept).
    """
    out = []
    for name, m in module.named_modules():
        if (isinstance(m, nn.Linear) or is_conv1d(m)) and not any(e in name for e in exclude):
            out.append((name, m))
    return out


def is_conv1d(m: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (``transformers.pytorch_utils.Conv1D``): ``y = x @ W + b`` with ``W: [in, out]``."""
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor)
