"""OwLore in the HF ``Trainer``: an optimizer factory for the drop-in route, and ``OwLoreTrainer`` for one class.

Drop-in (keep your own ``transformers.Trainer``)::

    optimizer = owlore.create_owlore_optimizer(model, config, lr=3e-4)
    trainer = Trainer(model, args, train_dataset=ds, optimizers=(optimizer, None),
                      callbacks=[owlore.OwLoreCallback(config)])

One class::

    trainer = owlore.OwLoreTrainer(model, args, train_dataset=ds, owlore_config=config)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from owlore.layerwise.callback import OwLoreCallback
from owlore.optim.galore_adamw import GaLoreAdamW, make_param_groups
from owlore.optim.state import unwrap_optimizer
from owlore.parallel.distributed import install_active_gradient_sync
from owlore.run.config import OwLoreConfig

logger = logging.getLogger(__name__)


def create_owlore_optimizer(
    model: nn.Module,
    config: OwLoreConfig | None = None,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    convention: str | None = None,
    embedding_state: str = "full",
    embedding_rank: int = 128,
    optimizer_cls: type[GaLoreAdamW] = GaLoreAdamW,
    **optimizer_kwargs: Any,
) -> GaLoreAdamW:
    """``GaLoreAdamW`` over *all* parameters: decoder linears projected with the config's GaLore settings.

    Every parameter is included, frozen or not, because ``OwLoreCallback`` unfreezes sampled layers later. With
    ``config.rank=None`` the decoder linears are trained full-rank ("OwLore (Full-Rank)").
    ``convention`` (default ``config.convention``): ``"hf"`` reproduces galore-torch's order of eps and weight
    decay (the official OwLore code), ``"torch"`` follows ``torch.optim.AdamW``. ``optimizer_kwargs`` go to
    ``optimizer_cls`` (``GaLoreAdamW`` or a subclass such as ``InBackwardGaLoreAdamW``)
    (``state_bits=8``, ``state_dtype``, ``master_weights``). ``embedding_state`` / ``embedding_rank``: the state of
    the input embedding and output head (``make_param_groups``).
    """
    config = config or OwLoreConfig()
    convention = convention or config.convention
    groups = make_param_groups(
        model,
        target_modules=config.target_modules,
        rank=config.rank or 1,
        update_proj_gap=config.update_proj_gap,
        scale=config.scale,
        proj_type=config.proj_type,
        basis_method=config.basis_method,
        power_iters=config.power_iters,
        weight_decay=weight_decay,
        layers_path=config.layers_path,
        embedding_state=embedding_state,
        embedding_rank=embedding_rank,
    )
    if config.rank is None:
        for g in groups:
            if g["name"] == "embedding":
                continue
            for k in ("rank", "update_proj_gap", "scale", "proj_type", "basis_method", "power_iters"):
                g.pop(k, None)
    return optimizer_cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, convention=convention,
                       **optimizer_kwargs)


class KeepOptimizerTrainer(Trainer):
    """A stock ``Trainer`` that always steps the optimizer it was given in ``optimizers=(optimizer, None)``.

    Under DeepSpeed, ``transformers.integrations.deepspeed_init`` sets ``trainer.optimizer = None`` and calls
    ``create_optimizer()``, which builds ``training.optim``'s AdamW: a method's own ``GaLoreAdamW`` would be
    replaced silently (GaLore projection gone, measured on a 2-process ZeRO-0 run). ``train.py`` uses this class.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._given_optimizer = self.optimizer

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self._given_optimizer is not None:
            self.optimizer = self._given_optimizer
        return super().create_optimizer(model)

    # A model sharded with owlore.parallel.fsdp.shard_model (parallel.fsdp2): the Trainer does not know it is sharded, so
    # weights are gathered on every rank before rank 0 writes them, and each rank keeps its own optimizer file.
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from owlore.parallel.fsdp import full_state_dict, has_shards

        if not has_shards(self.model):
            return super().save_model(output_dir, _internal_call)
        self._gathered = full_state_dict(self.model)  # a collective: every rank
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            self._gathered = None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is None and getattr(self, "_gathered", None) is not None:
            state_dict = self._gathered
        return super()._save(output_dir, state_dict=state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from owlore.parallel.fsdp import has_shards, save_optimizer

        if not has_shards(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        save_optimizer(self.optimizer, output_dir, self.args.process_index, self.args.world_size)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / "scheduler.pt")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        from owlore.parallel.fsdp import has_shards, load_optimizer

        host = getattr(unwrap_optimizer(self.optimizer), "host_state", None)
        if checkpoint is not None and host and not has_shards(self.model) and not self.is_deepspeed_enabled:
            # the Trainer would load the whole file onto the GPU first under several processes; state the
            # optimizer keeps on the host (state_policy: offload) should never pass through the device
            from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

            self.optimizer.load_state_dict(torch.load(Path(checkpoint) / OPTIMIZER_NAME, map_location="cpu",
                                                      weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))
            return None
        if checkpoint is None or not has_shards(self.model):
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_optimizer(self.optimizer, checkpoint, self.args.process_index, self.args.world_size)
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        from owlore.parallel.fsdp import has_shards, load_full_state_dict

        if not has_shards(self.model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        if self.args.process_index == 0:  # one copy of the model in host memory, not one per rank
            for f in sorted(Path(resume_from_checkpoint).glob("model*.safetensors")):
                state.update(load_file(str(f)))
        load_full_state_dict(self.model, state, broadcast_from_rank0=True)


class OwLoreTrainer(Trainer):
    """A ``Trainer`` that builds the OwLore optimizer and adds ``OwLoreCallback``.

    Args:
        owlore_config: OwLore settings (default ``OwLoreConfig()``).
        owlore_scores: per-layer outlier ratios, if known.
        calibration_batches: batches to compute the ratios from (default: first training batches).
        optimizer_kwargs: extra ``GaLoreAdamW`` options (``state_bits=8``, ``state_dtype``, ``master_weights``).
        *args, **kwargs: as for ``transformers.Trainer``. ``TrainingArguments`` ``learning_rate``,
            ``weight_decay``, ``adam_beta1/2`` and ``adam_epsilon`` are honoured.
    """

    def __init__(
        self,
        *args: Any,
        owlore_config: OwLoreConfig | None = None,
        owlore_scores: torch.Tensor | list[float] | None = None,
        calibration_batches: list[Any] | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.owlore_config = owlore_config or OwLoreConfig()
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.owlore_callback = OwLoreCallback(
            self.owlore_config, scores=owlore_scores, calibration_batches=calibration_batches,
            tokenizer=self.processing_class,
        )
        self.add_callback(self.owlore_callback)
        install_active_gradient_sync(self)  # several processes: all-reduce the active layers only, no DDP

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            a = self.args
            if a.optim not in ("adamw_torch", "adamw_torch_fused"):
                logger.warning("TrainingArguments.optim=%s is ignored: OwLoreTrainer always uses GaLoreAdamW", a.optim)
            self.optimizer = create_owlore_optimizer(
                model or self.model, self.owlore_config, lr=a.learning_rate, weight_decay=a.weight_decay,
                betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon, **self.optimizer_kwargs,
            )
            self.owlore_callback.mark_host_state(model or self.model, self.optimizer)
        return self.optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if isinstance(resume_from_checkpoint, str):
            self.owlore_callback.resume_dir = resume_from_checkpoint
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
