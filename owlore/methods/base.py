"""What a training method is: a name, its config sections, and a ``build`` that returns what a stock Trainer needs.

A method never runs the training loop. ``train.py`` (or your own script) loads the model, asks the method for
``MethodParts`` (the possibly wrapped model, an optimizer or None for the Trainer's own ``training.optim``, and
callbacks), and hands them to ``transformers.Trainer(model=..., optimizers=(optimizer, None), callbacks=...)``.
Adding a method is one module exporting ``METHOD`` plus one line in ``owlore.methods.REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from owlore.optim.param_groups import EMBEDDING_STATES
from owlore.run.output_dir import LAYER_STATE_FILE  # noqa: F401  (the methods' state_files name it)


@dataclass
class OptimizerConfig:
    """Optimizer options of the methods that build their own ``GaLoreAdamW`` (owlore, galore, lisa, badam).

    full, lora and qlora use the Trainer's optimizer instead: choose it with ``training.optim``.
    """

    state_bits: int = 32
    """32, or 8 for bitsandbytes blockwise-quantised Adam moments (CPU and CUDA), low-rank and full-rank alike."""
    state_dtype: str = "float32"
    """dtype of the moments and GaLore bases: float32 (default; they are small) or auto (follow the gradient,
    i.e. bf16 in a pure-bf16 run, as galore-torch and the official OwLore code do)."""
    master_weights: bool | None = None
    """Keep fp32 master copies of bf16/fp16 weights while they train. The copies live in the optimizer state, so
    under layer sampling (state dropped on a switch) only the active layers have one. None: the method's default
    (on for badam, as BAdam does; off for the others)."""
    update_in_backward: bool = False
    """Step each tensor inside backward as soon as its gradient is complete (``owlore.memory.in_backward``), so
    the gradients of the trained layers never coexist. Needs ``training.max_grad_norm=0`` (no global norm exists
    yet when a tensor steps); gradient accumulation works (the update waits for the last micro-batch), but then the
    gradients accumulate across micro-batches as usual and the option saves no gradient memory."""
    skip_non_finite: bool = True
    """Skip a tensor's update when its gradient holds inf/NaN (moments and weight unchanged). Costs one host read
    per step, or per tensor with ``update_in_backward``; false drops the test (as torch's AdamW), e.g. for bf16 on
    a GPU, where in-backward updates then never wait for the host."""
    embedding_state: str = "full"
    """Optimizer state of the input embedding / output head (on a large vocabulary the biggest trained tensors):
    full (AdamW), 8bit (blockwise 8-bit moments), lowrank (GaLore projection at ``embedding_rank``), factored
    (Adafactor-style row/column second moment, no first moment)."""
    embedding_rank: int = 128
    """Rank of the embedding's GaLore projection when ``embedding_state=lowrank``."""

    def problems(self, prefix: str = "optimizer.") -> list[str]:
        out = []
        if self.state_bits not in (8, 32):
            out.append(f"{prefix}state_bits={self.state_bits!r}: must be 32 or 8")
        if self.state_dtype not in ("float32", "auto"):
            out.append(f"{prefix}state_dtype={self.state_dtype!r}: must be float32 or auto")
        if self.embedding_state not in EMBEDDING_STATES:
            out.append(f"{prefix}embedding_state={self.embedding_state!r}: must be one of "
                       f"{', '.join(EMBEDDING_STATES)}")
        if not isinstance(self.embedding_rank, int) or self.embedding_rank < 1:
            out.append(f"{prefix}embedding_rank={self.embedding_rank!r}: must be a positive integer")
        return out

    def group_options(self) -> dict[str, Any]:
        """Keyword arguments for ``make_param_groups`` / ``create_owlore_optimizer`` (the embedding's state)."""
        return {"embedding_state": self.embedding_state, "embedding_rank": self.embedding_rank}

    def optimizer_kwargs(self, *, master_weights_default: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``GaLoreAdamW``."""
        master = master_weights_default if self.master_weights is None else self.master_weights
        return {"state_bits": self.state_bits, "master_weights": master, "skip_non_finite": self.skip_non_finite,
                "state_dtype": torch.float32 if self.state_dtype == "float32" else None}


@dataclass
class BuildContext:
    """Everything a method may read when it builds its parts."""

    model: nn.Module
    """The loaded model (quantised already if the method asked for it in ``model_kwargs``)."""
    config: Any
    """The whole ``owlore.run.recipe.RunConfig`` (method sections in ``config.sections``)."""
    args: Any
    """The ``transformers.TrainingArguments``."""
    tokenizer: Any = None

    def section(self, name: str) -> Any:
        return self.config.sections[name]


@dataclass
class MethodParts:
    """What the Trainer gets from a method."""

    model: nn.Module
    """The model to train (e.g. a ``PeftModel`` wrapping the loaded one)."""
    optimizer: torch.optim.Optimizer | None = None
    """None: the Trainer builds its own from ``training.optim``."""
    callbacks: list[Any] = field(default_factory=list)
    layer_callback: Any = None
    """The layer-switching callback (``OwLoreCallback``) if the method switches layers: train.py takes the per-layer
    record and plot from it and checks its state file when it picks a checkpoint to resume from."""


TRAINS = ("all", "sampled", "block", "adapters")


@dataclass(frozen=True)
class MemoryProfile:
    """How the memory estimator counts a method (``owlore.memory.plan`` reads this, never the method's name)."""

    trains: str = "all"
    """What trains: ``all`` (every decoder layer, the embeddings, head and final norm), ``sampled`` (γ decoder
    layers at a time, plus whatever the section's ``train_embeddings`` / ``train_lm_head`` / ``train_norms`` say),
    ``block`` (one block of ``block_size`` layers, nothing else: BAdam) or ``adapters`` (LoRA adapters on a
    frozen base)."""
    lowrank: bool = False
    """The trained decoder linears keep their moments in a rank-``rank`` projection (GaLore's layout)."""
    quantized_base: bool = False
    """The frozen base is NF4 (QLoRA); the unquantised parameters are fp32."""
    master_weights: bool = False
    """fp32 master copies of 16-bit trained weights by default (``optimizer.master_weights=None``)."""
    projected_state: bool | None = None
    """Count the optimizer state per tensor as ``GaLoreAdamW`` keeps it (projected moments of the low-rank
    linears, full-rank elsewhere) even though the Trainer builds the optimizer (APOLLO). None: follow
    ``Method.own_optimizer``."""
    options: Callable[[Any], dict[str, Any]] | None = None
    """The run config -> the estimator's keywords taken from the method's own section (``gamma``, ``rank``,
    ``block_size``, ``lora_rank`` ...; see ``owlore.memory.plan.Options``)."""

    def __post_init__(self) -> None:
        if self.trains not in TRAINS:
            raise ValueError(f"MemoryProfile.trains={self.trains!r}: must be one of {', '.join(TRAINS)}")


@dataclass(frozen=True)
class Method:
    """A registered training method, and what it supports: the config checks, the estimator, the benchmarks and
    the docs read these fields instead of lists of method names."""

    name: str
    summary: str
    """One line for the docs' method table."""
    build: Callable[[BuildContext], MethodParts]
    sections: dict[str, type] = field(default_factory=dict)
    """Config sections this method reads, name -> dataclass (each validated, each field a ``section.key``)."""
    own_optimizer: bool = False
    """True: the method builds ``GaLoreAdamW`` and reads the ``optimizer`` section; ``training.optim`` must stay
    at its default. False: the Trainer's ``training.optim`` is used (adamw_torch, adamw_bnb_8bit, ...)."""
    model_kwargs: Callable[[Any], dict[str, Any]] | None = None
    """Extra ``from_pretrained`` keyword arguments (QLoRA: ``quantization_config``)."""
    preflight: Callable[[Any, int], list[str]] | None = None
    """Checks against the model's decoder-layer count (read from ``config.json``, before any weights load)."""
    state_files: tuple[str, ...] = ()
    """Files a checkpoint of this method must hold to be complete (besides the Trainer's own)."""
    switches_layers: bool = False
    """Trains some decoder layers at a time and switches them (so ``memory.checkpointing=frozen`` and
    ``memory.frozen_weights=int8`` have frozen layers to act on)."""
    vision: bool = False
    """Trains a ``vision:`` LLaVA (the from-scratch tower trains and is saved with the language model)."""
    zero_stages: tuple[int, ...] = (0,)
    """DeepSpeed ZeRO stages it runs under (stage 0 is DeepSpeed's plain all-reduce; 1-3 partition the Trainer's
    optimizer, which a method with its own per-layer optimizer does not survive)."""
    fsdp2: bool = False
    """Runs sharded under ``parallel.fsdp2`` (tested by 2-process equality tests)."""
    memory: MemoryProfile = field(default_factory=MemoryProfile)
    seed_key: str | None = None
    """The config key of the method's own random draws (the layer sampler's seed), which a benchmark's seeds set
    along with ``training.seed``. BAdam leaves it None: its block order (``badam.seed``) stays at its default,
    so the sweeps' recorded commands stay comparable; vary it with a column override."""
    extras: tuple[str, ...] = ()
    """Optional dependencies it needs (``pip install .[name]``), for the docs and the benchmarks' defaults."""

    def all_sections(self) -> dict[str, type]:
        return {**self.sections, "optimizer": OptimizerConfig} if self.own_optimizer else dict(self.sections)




def adam_kwargs(args: Any) -> dict[str, Any]:
    """``lr``, ``weight_decay``, ``betas`` and ``eps`` from ``TrainingArguments``, for a method's own optimizer."""
    return {"lr": args.learning_rate, "weight_decay": args.weight_decay,
            "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}


def layer_switching_parts(ctx: BuildContext, config: Any, *, schedule: Callable[[int], Any] | None = None,
                          callback_cls: type | None = None, master_weights_default: bool = False) -> MethodParts:
    """``GaLoreAdamW`` over every parameter + the layer-switching callback: the parts of owlore, lisa and badam.

    ``config`` is the callback's ``OwLoreConfig`` (what switches, how often, what else trains, the projection);
    ``schedule`` replaces its outlier-weighted sampler (BAdam's block order).
    """
    from owlore.layerwise.callback import OwLoreCallback
    from owlore.memory.in_backward import in_backward_callbacks, in_backward_kwargs
    from owlore.trainer import create_owlore_optimizer

    section = ctx.section("optimizer")
    opt_kwargs = section.optimizer_kwargs(master_weights_default=master_weights_default)
    optimizer = create_owlore_optimizer(ctx.model, config, **adam_kwargs(ctx.args), **opt_kwargs,
                                        **section.group_options(),
                                        **in_backward_kwargs(section.update_in_backward, ctx.args))
    callback = (callback_cls or OwLoreCallback)(config, schedule=schedule, tokenizer=ctx.tokenizer)
    return MethodParts(ctx.model, optimizer, [callback, *in_backward_callbacks(optimizer)], layer_callback=callback)


def layer_count_problems(key: str, value: int, num_layers: int) -> list[str]:
    """``[]`` if ``value`` layers fit the model, else the problem line for ``key``."""
    if value <= num_layers:
        return []
    return [f"{key}={value}: the model has only {num_layers} decoder layers; set {key} <= {num_layers}"]
