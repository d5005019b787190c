"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for layer switching and GaLore: one shard unit per decoder layer.

``parallel.fsdp2: true`` shards the loaded model before the method builds its optimizer, so ``GaLoreAdamW`` holds
the ``DTensor`` shards and projects them where they are (``owlore.parallel.sharded``): weights, gradients and moments stay
sharded, a frozen layer has no gradient and (state dropped at the switch) no optimizer state, and a basis refresh
all-gathers only the gradient of the one matrix it refreshes. The Trainer is kept from wrapping the model in DDP
(``owlore.parallel.distributed.Replica``), and checkpoints hold the full weights (gathered, written by rank 0, loadable by
``from_pretrained``) plus one optimizer file per rank (its shards' state), so a run resumes on the same world size.

Not through HF's ``training.fsdp`` / accelerate's plugin: that path builds its own optimizer around the sharded
parameters (GaLore's per-layer groups would not survive), and on CPU it falls back to DDP without a word (measured
with accelerate 1.15: no DTensor parameters after ``prepare``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from owlore.layerwise.layers import find_decoder_layers
from owlore.parallel.sharded import is_sharded
from owlore.run.fileio import atomic_write

logger = logging.getLogger(__name__)


def shard_model(model: nn.Module, *, layers_path: str | None = None, reshard_after_forward: bool = True) -> int:
    """``fully_shard`` every decoder layer, then the root (embeddings, final norm, head); returns the unit count.

    Needs an initialised process group (``TrainingArguments`` creates it under ``torchrun``). CPU tensors use the
    gloo backend, CUDA ones NCCL; the mesh spans the world.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    layers = find_decoder_layers(model, layers_path)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    logger.info("FSDP2: %d decoder layers and the root sharded over %d ranks", len(layers), mesh.size())
    return len(layers) + 1


def has_shards(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (a collective: call it on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *,
                         broadcast_from_rank0: bool = False) -> None:
    """Scatter full weights into the shards: every rank passes the same dict, or (``broadcast_from_rank0``) rank 0
    passes it and the others ``{}``, so that only one process holds the whole model in host memory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True,
                                                                     broadcast_from_rank0=broadcast_from_rank0))


def optimizer_file(checkpoint: str | Path, rank: int, world: int) -> Path:
    return Path(checkpoint) / f"optimizer.rank{rank}-of-{world}.pt"


def save_optimizer(optimizer: Any, checkpoint: str | Path, rank: int, world: int) -> None:
    """This rank's optimizer state (its shards' moments, the full GaLore bases), written atomically."""
    state = optimizer.state_dict()
    atomic_write(optimizer_file(checkpoint, rank, world), lambda tmp: torch.save(state, tmp))


def load_optimizer(optimizer: Any, checkpoint: str | Path, rank: int, world: int) -> None:
    path = optimizer_file(checkpoint, rank, world)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an FSDP2 checkpoint resumes on the world size that wrote it "
                                f"({world} processes here); found {sorted(p.name for p in Path(checkpoint).glob('optimizer.rank*'))}")
    optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
