"""BAdam (arXiv 2404.02827, https://arxiv.org/abs/2404.02827): block-coordinate Adam over decoder layers.

The decoder layers are cut into blocks of ``block_size`` consecutive layers. One block trains at a time, in
ascending, descending or random-permutation order (a fresh permutation each pass, as BAdam's ``random`` mode), and
the next block takes over every ``switch_every`` optimizer steps; the Adam state is reset on a switch. Everything
outside the blocks (embeddings, head, final norm) stays frozen, as in BAdam's default block list. bf16/fp16
weights get fp32 master copies while their block trains (BAdam keeps them for the active block only); our
optimizer keeps them in its state, which the switch frees.

Not implemented: BAdam's optional embedding / lm_head blocks and its DeepSpeed ZeRO-3 path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from owlore.methods.base import (
    LAYER_STATE_FILE,
    BuildContext,
    MemoryProfile,
    Method,
    MethodParts,
    layer_count_problems,
    layer_switching_parts,
)
from owlore.run.config import OwLoreConfig

SWITCH_MODES = ("ascending", "descending", "random")


@dataclass
class BAdamConfig:
    """BAdam's knobs (defaults: the BAdam README's one layer per block, switch every 100 steps, random order)."""

    block_size: int = 1
    """Consecutive decoder layers per block (the last block may be shorter)."""
    switch_every: int = 100
    """Optimizer steps per block (README: min(max(n / (batch · blocks), 50), 100))."""
    switch_mode: str = "random"
    """ascending, descending, or random (a new random permutation of the blocks every pass)."""
    start_block: int | None = None
    """Block to start from (default: the first of the order; in random mode, the first of the first pass)."""
    seed: int = 0
    """Seed of the schedule's own generator (random mode)."""
    layers_path: str | None = None
    """Attribute path of the decoder layers when auto-discovery fails."""

    def problems(self, prefix: str = "badam.") -> list[str]:
        out = []
        if self.block_size < 1:
            out.append(f"{prefix}block_size={self.block_size}: must be >= 1 (decoder layers per block)")
        if self.switch_every < 1:
            out.append(f"{prefix}switch_every={self.switch_every}: must be >= 1 (BAdam README: 50-100)")
        if self.switch_mode not in SWITCH_MODES:
            out.append(f"{prefix}switch_mode={self.switch_mode!r}: must be one of {', '.join(SWITCH_MODES)}")
        if self.start_block is not None and self.start_block < 0:
            out.append(f"{prefix}start_block={self.start_block}: must be >= 0 or null")
        return out


class BlockSchedule:
    """Which block trains next: pure, with its own generator and a ``weights_only``-loadable state.

    Same interface as ``LayerSampler`` (``sample``, ``counts``, ``state_dict``, ``load_state_dict``), so the
    layer-switching callback runs it unchanged.
    """

    def __init__(self, num_layers: int, *, block_size: int = 1, mode: str = "random", start_block: int | None = None,
                 seed: int = 0) -> None:
        if mode not in SWITCH_MODES:
            raise ValueError(f"mode={mode!r} must be one of {SWITCH_MODES}")
        if not 1 <= block_size <= num_layers:
            raise ValueError(f"block_size={block_size} must be in [1, {num_layers}] (decoder layers)")
        self.blocks = [list(range(i, min(i + block_size, num_layers))) for i in range(0, num_layers, block_size)]
        if start_block is not None and not 0 <= start_block < len(self.blocks):
            raise ValueError(f"start_block={start_block} must be in [0, {len(self.blocks) - 1}]")
        self.mode = mode
        self.block_size = block_size
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = torch.zeros(num_layers, dtype=torch.long)
        self.num_draws = 0
        n = len(self.blocks)
        base = list(range(n)) if mode != "descending" else list(range(n - 1, -1, -1))
        if start_block is not None and mode != "random":
            k = base.index(start_block)
            base = base[k:] + base[:k]
        self._order = torch.tensor(base, dtype=torch.long)
        self._position = 0
        self._start = start_block

    def sample(self) -> list[int]:
        """The next block's layer indices; a new pass starts (re-permuted in random mode) after the last block."""
        if self._position == 0 and self.mode == "random":
            self._order = torch.randperm(len(self.blocks), generator=self.generator)
            if self.num_draws == 0 and self._start is not None:  # BAdam honours start_block in every mode
                k = int((self._order == self._start).nonzero())
                self._order[[0, k]] = self._order[[k, 0]]
        block = self.blocks[int(self._order[self._position])]
        self._position = (self._position + 1) % len(self.blocks)
        self.counts[block] += 1
        self.num_draws += 1
        return list(block)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "counts": self.counts.clone(), "num_draws": self.num_draws,
                "order": self._order.clone(), "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["counts"].numel() != self.counts.numel():
            raise ValueError(f"schedule state is for {state['counts'].numel()} layers, this one has "
                             f"{self.counts.numel()}")
        self.generator.set_state(state["generator"])
        self.counts = state["counts"].clone().long()
        self.num_draws = int(state["num_draws"])
        self._order = state["order"].clone().long()
        self._position = int(state["position"])

    def __repr__(self) -> str:
        return f"BlockSchedule(blocks={len(self.blocks)}, block_size={self.block_size}, mode={self.mode!r})"


@functools.cache
def _block_callback_class() -> type:
    """``OwLoreCallback`` that frees the *whole* optimizer state at every switch, as BAdam does.

    The layer-sampling callback frees only the state of layers that leave the active set, so a block drawn again
    right away (a single block, or the last block of one random pass drawn first in the next) would keep its
    moments, step count and master copies. BAdam (``BlockOptimizer.switch_trainable_params``) clears the state and
    rebuilds the fp32 copies on every switch, whichever block comes next.
    """
    from owlore.layerwise.callback import OwLoreCallback
    from owlore.optim.state import drop_state

    class BAdamCallback(OwLoreCallback):
        def _switch(self, step: int) -> None:
            drop_state(self.optimizer, self._params_of(self.active))
            super()._switch(step)

    return BAdamCallback


def build(ctx: BuildContext) -> MethodParts:
    c: BAdamConfig = ctx.section("badam")
    switching = OwLoreConfig(gamma=c.block_size, interval=c.switch_every, mode="uniform", rank=None,
                             state_policy="reset", seed=c.seed, train_embeddings=False, train_lm_head=False,
                             train_norms=False, layers_path=c.layers_path)

    def schedule(num_layers: int) -> BlockSchedule:
        return BlockSchedule(num_layers, block_size=c.block_size, mode=c.switch_mode, start_block=c.start_block,
                             seed=c.seed)

    return layer_switching_parts(ctx, switching, schedule=schedule, callback_cls=_block_callback_class(),
                                 master_weights_default=True)  # BAdam's fp32 copies of the active block


def preflight(cfg, num_layers: int) -> list[str]:
    c = cfg.sections["badam"]
    out = layer_count_problems("badam.block_size", c.block_size, num_layers)
    blocks = -(-num_layers // max(c.block_size, 1))
    if c.start_block is not None and c.start_block >= blocks:
        out.append(f"badam.start_block={c.start_block}: there are {blocks} blocks; use 0..{blocks - 1}")
    return out


def memory_options(cfg) -> dict:
    """The estimator's keywords from the ``badam`` section."""
    return {"block_size": cfg.sections["badam"].block_size}


METHOD = Method(
    name="badam",
    summary="one block of decoder layers at a time in a fixed or permuted order, Adam state reset on a switch",
    build=build,
    sections={"badam": BAdamConfig},
    own_optimizer=True,
    preflight=preflight,
    state_files=(LAYER_STATE_FILE,),
    switches_layers=True,
    vision=True,
    memory=MemoryProfile(trains="block", master_weights=True, options=memory_options),
)
