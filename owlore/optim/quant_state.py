"""How ``GaLoreAdamW`` stores its state: moments in a chosen dtype or 8-bit blockwise quantised, fp32 master weights.

8-bit optimizer states (Dettmers et al., arXiv 2110.02861, https://arxiv.org/abs/2110.02861): each moment is kept as
uint8 indices into a dynamic quantisation map (signed for ``exp_avg``, unsigned for the non-negative
``exp_avg_sq``) plus one fp32 absmax per block of ``BLOCKSIZE`` values. Blockwise scaling means an outlier only
costs precision inside its own block, which is what makes 8 bits enough for Adam moments.

Unlike galore-torch's ``GaLoreAdamW8bit`` (fused CUDA kernels that swap ``p.data``), every step here dequantises the
moments, runs the same ``adamw_update`` as the 32-bit path and quantises them again. So the 8-bit optimizer differs
from the 32-bit one only by the storage rounding, works on every device bitsandbytes' blockwise (de)quantisation
supports (CPU and CUDA), and the state stays plain tensors (``torch.load(weights_only=True)`` safe). The price is
one fp32 copy of a parameter's moments alive at a time, which is small next to the saving.

bitsandbytes is imported only when 8-bit state is actually requested. The fp32 master copy of a bf16/fp16 weight
(``update_target``) is the other half of low-precision training: without it, updates below half an ulp of the
weight vanish.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor

BLOCKSIZE: int = 256
"""Values per absmax block (bitsandbytes' 8-bit optimizers use 256 as well)."""
MIN_8BIT_SIZE: int = 4096
"""Moments with fewer elements stay unquantised, like bitsandbytes' ``min_8bit_size``: tiny tensors (biases,
norms) save almost nothing and are the most sensitive to rounding."""
MOMENTS: tuple[str, str] = ("exp_avg", "exp_avg_sq")
_SIGNED: dict[str, bool] = {"exp_avg": True, "exp_avg_sq": False}


def bitsandbytes_functional() -> ModuleType:
    """``bitsandbytes.functional``, imported on first use so that 32-bit training never needs bitsandbytes.

    Raises:
        ImportError: bitsandbytes is not installed; the message says how to install or avoid it.
    """
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:
        raise ImportError(
            "8-bit optimizer state (state_bits=8) needs bitsandbytes: pip install bitsandbytes. "
            "To train without it, keep the optimizer's state_bits=32 (the default)."
        ) from err
    return bnb_functional


class CodeMaps:
    """Per-device cache of the two dynamic quantisation maps.

    The maps are constants (256 floats each), so they live on the optimizer rather than in its state: the state
    stays tensors-and-ints per parameter, and a state moved to another device finds the map already there.
    """

    def __init__(self) -> None:
        self._maps: dict[tuple[bool, torch.device], Tensor] = {}

    def get(self, signed: bool, device: torch.device) -> Tensor:
        """The signed (``exp_avg``) or unsigned (``exp_avg_sq``) map on ``device``."""
        key = (signed, device)
        if key not in self._maps:
            self._maps[key] = bitsandbytes_functional().create_dynamic_map(signed=signed).to(device)
        return self._maps[key]


def quantize(x: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantisation of ``x``: uint8 codes shaped like ``x`` and one fp32 absmax per block."""
    codes, quant_state = bitsandbytes_functional().quantize_blockwise(x, code=code, blocksize=BLOCKSIZE)
    return codes, quant_state.absmax


def dequantize(codes: Tensor, absmax: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of ``quantize`` (up to its rounding), as a fresh ``dtype`` tensor shaped like ``codes``."""
    values = bitsandbytes_functional().dequantize_blockwise(
        codes, absmax=absmax, code=code, blocksize=BLOCKSIZE
    )
    return values.to(dtype)


def load_moments(
    state: dict[str, Any],
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    maps: CodeMaps,
) -> tuple[Tensor, Tensor]:
    """``exp_avg`` and ``exp_avg_sq`` as ``dtype`` tensors for ``adamw_update`` to update in place.

    Zeros on a param's first step; dequantised copies if stored in 8 bits; otherwise the stored tensors themselves
    (no copy, so the 32-bit path is exactly the old in-place update), cast if they were stored in another dtype
    (an older checkpoint, or a group whose ``state_dtype`` changed).
    """
    if "exp_avg" not in state:
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
    loaded = []
    for key in MOMENTS:
        value = state[key]
        if value.dtype == torch.uint8:
            value = dequantize(value, state[f"{key}_absmax"], maps.get(_SIGNED[key], value.device), dtype)
        loaded.append(value.to(dtype))
    return loaded[0], loaded[1]


def store_moments(
    state: dict[str, Any], moments: tuple[Tensor, Tensor], *, bits: int, maps: CodeMaps
) -> None:
    """Write the updated moments back: 8-bit codes plus ``<key>_absmax`` if ``bits == 8`` and they are big enough.

    The format is decided afresh every step, so changing a group's ``state_bits`` converts its state on the
    next step instead of failing.
    """
    quantise = bits == 8 and moments[0].numel() >= MIN_8BIT_SIZE
    for key, value in zip(MOMENTS, moments):
        if quantise:
            state[key], state[f"{key}_absmax"] = quantize(value, maps.get(_SIGNED[key], value.device))
        else:
            state[key] = value
            state.pop(f"{key}_absmax", None)


def update_target(p: Tensor, state: dict[str, Any], *, master_weights: bool) -> Tensor:
    """The tensor the update is applied to: ``p`` itself, or its fp32 master copy ``state["master"]``.

    The copy is made from the current weight when missing (a param's first step, or its first step after
    ``drop_state``), so only params that have state, i.e. the active layers, pay for it. fp32 params need none.
    """
    if not (master_weights and p.dtype in (torch.bfloat16, torch.float16)):
        state.pop("master", None)  # the group switched master weights off
        return p
    if "master" not in state:
        state["master"] = p.detach().to(torch.float32)
    return state["master"]


def check_state_options(group: dict[str, Any], where: str) -> None:
    """Validate a group's ``state_dtype``, ``master_weights`` and ``state_bits`` when it is added, not in ``step``.

    Raises:
        ValueError: an invalid value, named with ``where``.
        ImportError: ``state_bits=8`` without bitsandbytes (so it fails at construction, with the install hint).
    """
    dtype, bits = group["state_dtype"], group["state_bits"]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{where}: state_dtype must be a floating torch.dtype or None, got {dtype!r}")
    if not isinstance(group["master_weights"], bool):
        raise ValueError(f"{where}: master_weights must be a bool, got {group['master_weights']!r}")
    if not (isinstance(bits, int) and bits in (8, 32)):
        raise ValueError(f"{where}: state_bits must be 8 or 32, got {bits!r}")
    if bits == 8:
        bitsandbytes_functional()
