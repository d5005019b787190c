"""``OwLoreCallback``: outlier-weighted layer sampling inside any ``transformers.Trainer``.

OwLore, arXiv 2405.18380; the callback pattern follows LISA (arXiv 2403.17919, OptimalScale/LMFlow
``DynamicLayerActivationCallback``) with its known problems fixed:

* Decoder layers are frozen in ``on_train_begin``, *after* the optimizer exists, so every layer's parameters
  are in the optimizer (freezing before silently excludes layers sampled later: LMFlow #726).
* Optimizer state of switched-off layers is freed (``state_policy="reset"``, like BAdam) so state memory is O(γ)
  layers, not O(L) (LMFlow #729/#768); ``keep`` is the official behaviour, ``offload`` moves it to CPU.
* The sampler has its own generator; its state, the active set, the outlier ratios and the history are saved
  with every checkpoint (``owlore_state.pt``, tensors only) and re-applied on resume, so a resumed run draws the
  same future layers and gives the same losses as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from owlore.layerwise.checkpointing import prepare_checkpointing
from owlore.layerwise.layers import find_decoder_layers, set_layers_trainable
from owlore.layerwise.sampler import LayerSampler
from owlore.optim.state import drop_state, move_state, state_bytes, unwrap_optimizer
from owlore.parallel.distributed import SwitchingDataParallel, deepspeed_stage, engine_of
from owlore.run.config import OwLoreConfig
from owlore.run.fileio import atomic_write
from owlore.run.metrics import OwLoreLogger, owlore_tensorboard_dir, peak_memory_bytes
from owlore.run.output_dir import LAYER_STATE_FILE as STATE_FILE
from owlore.run.output_dir import PARTIAL_RECORD_FILE, RECORD_FILE

logger = logging.getLogger(__name__)


class OwLoreCallback(TrainerCallback):
    """Samples γ decoder layers every ``interval`` optimizer steps and trains only those.

    Args:
        config: the OwLore settings.
        scores: per-layer outlier ratios, if already known (skips the computation).
        calibration_batches: batches (``input_ids`` tensors or dicts) to compute the ratios from. Default: the
            first ``config.calibration_batches`` batches of the training set in dataset order (read directly from
            the dataset, so the shuffled training order is not disturbed), or ``config.calibration_source``.
        tokenizer: needed only with ``config.calibration_source``.
        resume_dir: checkpoint directory to restore OwLore's state from when resuming, if it is not
            ``<output_dir>/checkpoint-<global_step>`` or ``TrainingArguments.resume_from_checkpoint``.
        schedule: ``num_layers -> schedule`` factory replacing the outlier-weighted ``LayerSampler`` (BAdam's
            block order, say). A schedule has ``sample() -> list[int]``, ``counts``, ``state_dict()`` and
            ``load_state_dict()``; no outlier ratios are computed for it.
    """

    def __init__(
        self,
        config: OwLoreConfig | None = None,
        *,
        scores: torch.Tensor | list[float] | None = None,
        calibration_batches: list[Any] | None = None,
        tokenizer: Any = None,
        resume_dir: str | None = None,
        schedule: Callable[[int], Any] | None = None,
    ) -> None:
        self.config = config or OwLoreConfig()
        self.scores = None if scores is None else torch.as_tensor(scores, dtype=torch.float64)
        self.calibration_batches = calibration_batches
        self.tokenizer = tokenizer
        self.resume_dir = resume_dir
        self.schedule_factory = schedule
        self.sampler: Any = None
        self.active: list[int] = []
        self.history: list[tuple[int, list[int]]] = []
        self.last_switch_step = -1
        self.layers: nn.ModuleList | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._tb: OwLoreLogger | None = None
        self._output_dir: Path | None = None
        self._peft = False
        self._peft_ids: set[int] | None = None
        self._is_main = True
        self._saved_step = -1
        self._input_grad_hook: torch.utils.hooks.RemovableHandle | None = None
        self.data_parallel = SwitchingDataParallel()
        """Several processes: the active-gradient reducer and the cross-rank checks (``owlore.parallel.distributed``)."""

    # ----------------------------------------------------------------------------------------------- set-up
    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Under ``state_policy: offload`` a resumed optimizer must load the layers' state into host memory (the
        Trainer loads it before ``on_train_begin``); ``on_train_begin`` then moves the active layers' part over."""
        self.mark_host_state(model, optimizer)

    def mark_host_state(self, model, optimizer) -> None:
        """Tell a ``GaLoreAdamW`` to load the decoder layers' state into host memory (``state_policy: offload``);
        also called by ``OwLoreTrainer.create_optimizer``, whose optimizer does not exist at ``on_init_end``."""
        if self.config.state_policy != "offload" or model is None or optimizer is None:
            return
        opt = unwrap_optimizer(optimizer)
        if hasattr(opt, "host_state"):
            opt.host_state = {id(p) for p in find_decoder_layers(model, self.config.layers_path).parameters()}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if self.tokenizer is None and kwargs.get("processing_class") is not None:
            proc = kwargs["processing_class"]
            self.tokenizer = getattr(proc, "tokenizer", proc)  # a multimodal processor wraps its tokenizer
        if model is None or optimizer is None:
            raise RuntimeError("OwLoreCallback needs the Trainer's model and optimizer in on_train_begin")
        self.optimizer = unwrap_optimizer(optimizer)
        model = getattr(model, "module", model) if engine_of(args) == "deepspeed" else model  # the engine's module
        self.layers = find_decoder_layers(model, self.config.layers_path)
        self._peft = hasattr(model, "peft_config")
        if self._peft and self._peft_ids is None:
            # Whatever the adapter type (LoRA, IA3, VeRA, modules_to_save ...), train what peft left trainable.
            self._peft_ids = {id(p) for p in self.layers.parameters() if p.requires_grad}
        self._output_dir = Path(args.output_dir)
        self._is_main = args.process_index == 0
        self._check_distributed(args)
        if self.schedule_factory is None and self.config.gamma > len(self.layers):
            raise ValueError(f"owlore.gamma={self.config.gamma} exceeds the model's {len(self.layers)} decoder "
                             f"layers; set owlore.gamma <= {len(self.layers)}")
        self._check_optimizer_covers_layers()
        restored = self._restore(args, state) if state.global_step > 0 else None
        if self.scores is None and self._uses_scores():
            from owlore.parallel.sharded import is_sharded

            self.scores = self.data_parallel.scores_from_rank0(
                lambda: self._compute_scores(model, args, train_dataloader), len(self.layers),
                every_rank_computes=any(is_sharded(p) for p in model.parameters()))
        elif self.scores is not None:  # given or restored: every rank must have been given the same
            self.data_parallel.check_scores(self.scores)
        if self.scores is not None and len(self.scores) != len(self.layers):
            raise ValueError(f"got {len(self.scores)} outlier scores for {len(self.layers)} decoder layers")
        if self.sampler is None:
            self.sampler = self._new_sampler()
        if restored is not None:
            self.sampler.load_state_dict(restored["sampler"])
        self._freeze_outside_layers(model)
        self._prepare_checkpointing(model)
        self._apply_active(self.active)
        if SwitchingDataParallel.wanted(args, model):
            self.data_parallel.attach(model, bucket_mb=args.ddp_bucket_cap_mb or 25.0)
        if self.config.state_policy == "offload":  # resumed: the layers' state was loaded into host memory
            self._place_states(to_host=set(range(len(self.layers))) - set(self.active), to_device=self.active)
        if args.process_index == 0 and "tensorboard" in (args.report_to or []):
            self._tb = OwLoreLogger(owlore_tensorboard_dir(args.output_dir))
        logger.info("OwLore: %s, %d decoder layers, gamma=%d, interval=%d, state_policy=%s", self.sampler,
                    len(self.layers), self.config.gamma, self.config.interval, self.config.state_policy)
        self.write_record()

    def _check_distributed(self, args) -> None:
        engine = engine_of(args)
        stage = deepspeed_stage(args) if engine == "deepspeed" else 0
        if stage:
            raise NotImplementedError(
                f"DeepSpeed ZeRO stage {stage} with layer switching: ZeRO flattens every layer into fp32 partitions "
                "when it starts, so state memory does not shrink with gamma, frozen layers are stepped with zero "
                "gradients (their momentum keeps moving them), and GaLore cannot project 1-D partitions (GaLore "
                "#2). Use ZeRO stage 0 (training.deepspeed=configs/deepspeed/zero0.json), plain data parallelism "
                "(torchrun, no training.deepspeed), or FSDP2.")

    def _check_optimizer_covers_layers(self) -> None:
        in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [i for i, layer in enumerate(self.layers) if any(
            id(p) not in in_opt for p in layer.parameters() if not self._peft or id(p) in self._peft_ids)]
        if missing:
            raise RuntimeError(
                f"decoder layers {missing} have parameters that are not in the optimizer, so they could never be "
                "trained when sampled. Build the optimizer before freezing layers (owlore.create_owlore_optimizer "
                "includes every parameter), and do not freeze decoder layers yourself.")

    def _uses_scores(self) -> bool:
        return self.schedule_factory is None and self.config.mode in ("owl", "owl_reverse")

    def _new_sampler(self) -> Any:
        if self.schedule_factory is not None:
            return self.schedule_factory(len(self.layers))
        c = self.config
        scores = self.scores if self.scores is not None else torch.ones(len(self.layers), dtype=torch.float64)
        return LayerSampler(scores, gamma=c.gamma, mode=c.mode, temperature=c.temperature, floor=c.floor,
                            seed=c.seed, scheme=c.scheme)

    def _compute_scores(self, model, args, train_dataloader) -> torch.Tensor:
        from owlore.layerwise.calibration import CalibrationSpec, outlier_ratios_from_spec

        c = self.config
        if c.calibration_source:
            if self.tokenizer is None:
                raise ValueError("owlore.calibration_source needs a tokenizer: pass tokenizer= to OwLoreCallback or "
                                 "processing_class= to the Trainer")
            spec = CalibrationSpec(c.calibration_source, c.calibration_samples, c.calibration_seqlen, c.seed)
            return outlier_ratios_from_spec(model, self.tokenizer, spec, threshold=c.threshold, layers=self.layers,
                                            cache_dir=c.cache_dir, progress=self._is_main)
        batches = self.calibration_batches or self._first_batches(args, train_dataloader)
        digest = hashlib.sha256()  # the cache key must change with the calibration tokens themselves
        for b in batches:
            digest.update((b["input_ids"] if isinstance(b, Mapping) else b).detach().cpu().numpy().tobytes())
        spec = CalibrationSpec(source=f"train-batches:{digest.hexdigest()[:16]}", nsamples=len(batches),
                               seqlen=0, seed=c.seed)
        return outlier_ratios_from_spec(model, None, spec, threshold=c.threshold, layers=self.layers,
                                        cache_dir=c.cache_dir, progress=self._is_main, batches=batches)

    def _first_batches(self, args, dl) -> list[dict[str, torch.Tensor]]:
        if dl is None:
            raise RuntimeError("no calibration data: pass scores=, calibration_batches= or set calibration_source")
        dataset, collate = dl.dataset, dl.collate_fn
        bs = args.per_device_train_batch_size
        # the rows of the first calibration_batches *global* batches, so that every world size sees the same ones
        n = min(len(dataset), self.config.calibration_batches * bs * max(1, args.world_size))
        out = []
        for start in range(0, n, bs):
            batch = collate([dataset[i] for i in range(start, min(start + bs, n))])
            out.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
        return out

    def _language_model_root(self, model: nn.Module) -> nn.Module:
        """The module that owns the decoder layers (e.g. ``LlamaModel``, or LLaVA's ``language_model``)."""
        for _, module in model.named_modules():
            if any(child is self.layers for child in module.children()):
                return module
        return model

    def _freeze_outside_layers(self, model: nn.Module) -> None:
        """Parameters outside the decoder layers train per config; anything not part of the language model
        (a LLaVA vision tower and projector) is frozen."""
        c = self.config
        if self._peft:  # peft already froze the base model; leave its choices alone outside the layers
            return
        inside = {id(p) for p in self.layers.parameters()}
        root = self._language_model_root(model)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        lm_emb = {id(p) for m in root.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        lm_norm = {id(p) for m in root.modules() if "norm" in type(m).__name__.lower() for p in m.parameters()}
        frozen_other = 0
        for p in model.parameters():
            if id(p) in inside:
                continue
            if id(p) in emb_ids or id(p) in head_ids:
                # A tied head is the embedding matrix: it trains if either flag asks for it.
                on = (id(p) in emb_ids and c.train_embeddings) or (id(p) in head_ids and c.train_lm_head)
            elif id(p) in lm_emb:  # e.g. GPT-2's position embeddings
                on = c.train_embeddings
            elif id(p) in lm_norm:
                on = c.train_norms
            else:  # outside the language model: a LLaVA vision tower and projector
                on = c.train_vision
                frozen_other += 0 if on else p.numel()
            p.requires_grad_(on)
        if frozen_other:
            logger.info("froze %d parameters outside the language model (e.g. a vision tower)", frozen_other)

    def _prepare_checkpointing(self, model: nn.Module) -> None:
        if self._input_grad_hook is not None:  # at most one input-grad hook, however often training begins
            self._input_grad_hook.remove()
        self._input_grad_hook = prepare_checkpointing(model, peft=self._peft)

    # ------------------------------------------------------------------------------------------ switching
    def _params_of(self, layer_ids) -> list[torch.Tensor]:
        return [p for i in sorted(layer_ids) for p in self.layers[i].parameters()]

    def _apply_active(self, active: list[int]) -> None:
        set_layers_trainable(self.layers, active, param_ids=self._peft_ids if self._peft else None)

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.config.interval == 0 and step != self.last_switch_step:
            self._switch(step)

    def _place_states(self, *, to_host: Iterable[int], to_device: Iterable[int]) -> None:
        """``state_policy: offload``: the optimizer state of the ``to_host`` layers in host memory, that of the
        ``to_device`` layers beside their parameters."""
        move_state(self.optimizer, self._params_of(to_host), "cpu")
        for p in self._params_of(to_device):
            move_state(self.optimizer, [p], p.device)

    def _switch(self, step: int) -> None:
        new = self.sampler.sample()
        old = set(self.active)
        leaving, entering = old - set(new), set(new) - old
        policy = self.config.state_policy
        if policy == "reset":
            drop_state(self.optimizer, self._params_of(leaving))
        elif policy == "offload":
            self._place_states(to_host=leaving, to_device=entering)
        self.data_parallel.check_switch(step, new)
        self._apply_active(new)
        self.data_parallel.after_switch()
        self.active = new
        self.last_switch_step = step
        self.history.append((step, list(new)))
        logger.info("step %d: training decoder layers %s", step, new)
        if self._tb:
            self._tb.switch(step, new, self.sampler.counts)
        self.write_record()

    # ------------------------------------------------------------------------------- logging / saving
    def metrics(self) -> dict[str, float]:
        """OwLore's own scalars: optimizer-state bytes, SVD seconds, peak memory, trainable layer count."""
        return {
            "owlore/optimizer_state_bytes": float(state_bytes(self.optimizer)) if self.optimizer else 0.0,
            "owlore/svd_seconds": float(getattr(self.optimizer, "svd_seconds", 0.0)),
            "owlore/peak_memory_bytes": float(peak_memory_bytes()),
            "owlore/active_layers": float(len(self.active)),
            **{f"owlore/{k}": v for k, v in self.data_parallel.metrics().items()},
        }

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._tb:
            self._tb.scalars(state.global_step, self.metrics())

    def record(self) -> dict[str, Any]:
        """The JSON record: ratios, sampling probabilities, inclusion probabilities, history, counts."""
        s = self.sampler
        probs = getattr(s, "probabilities", None)
        inclusion = s.inclusion_probabilities() if hasattr(s, "inclusion_probabilities") else None
        return {
            "config": self.config.to_dict(),
            "schedule": repr(s) if s is not None else None,
            # None when the schedule does not use them (uniform / increase / decrease modes, BAdam)
            "outlier_ratios": self.scores.tolist() if self.scores is not None else None,
            "sampling_probabilities": probs.tolist() if probs is not None else None,
            "inclusion_probabilities": inclusion.tolist() if inclusion is not None else None,
            "activation_counts": s.counts.tolist() if s is not None else None,
            "history": [{"step": st, "layers": ls} for st, ls in self.history],
        }

    def write_record(self, *, final: bool = False, **extra: Any) -> None:
        """Write ``record()`` (plus ``extra`` top-level entries) atomically: while training to
        ``owlore_record.partial.json``, at the end (``final``) to ``owlore_record.json``, so a run that crashes
        never replaces an earlier run's record (``owlore.run.output_dir``)."""
        if self._output_dir is None or not self._is_main:  # one writer under DDP
            return
        text = json.dumps({**self.record(), **extra}, indent=1, default=str)
        name = RECORD_FILE if final else PARTIAL_RECORD_FILE
        atomic_write(self._output_dir / name, lambda tmp: Path(tmp).write_text(text))
        if final:
            (self._output_dir / PARTIAL_RECORD_FILE).unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: tensors, ints and lists only (``torch.load(weights_only=True)``)."""
        out = {
            "sampler": self.sampler.state_dict(),
            "active": torch.tensor(self.active, dtype=torch.long),
            "last_switch_step": self.last_switch_step,
            "history_steps": torch.tensor([s for s, _ in self.history], dtype=torch.long),
            # flat + sizes: a BAdam block order may have a shorter last block
            "history_layers": torch.tensor([i for _, ls in self.history for i in ls], dtype=torch.long),
            "history_sizes": torch.tensor([len(ls) for _, ls in self.history], dtype=torch.long),
        }
        if self.scores is not None:
            out["scores"] = self.scores.clone()
        return out

    def save_to(self, checkpoint_dir: str | Path, global_step: int) -> None:
        """Write ``owlore_state.pt`` (``state_dict()`` and the step it belongs to) atomically into a checkpoint."""
        payload = {**self.state_dict(), "global_step": global_step}
        atomic_write(Path(checkpoint_dir) / STATE_FILE, lambda tmp: torch.save(payload, tmp))

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer saves right after on_step_end, and writes trainer_state.json last (then deletes older
        # checkpoints). Writing our state first means a checkpoint that looks complete always has it.
        if control.should_save and args.should_save and self.sampler is not None:
            self.save_to(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
            self._saved_step = state.global_step

    def on_save(self, args, state, control, **kwargs):
        # Fallback for saves decided after on_step_end (e.g. save_strategy=epoch): right after the Trainer's files.
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # a file already there may be a previous run's (same output_dir): only this run's own write counts
        if not args.should_save or not ckpt.is_dir() or self._saved_step == state.global_step:
            return
        self.save_to(ckpt, state.global_step)

    def _restore(self, args, state) -> dict[str, Any] | None:
        candidates = [self.resume_dir, Path(args.output_dir) / f"checkpoint-{state.global_step}"]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.insert(1, args.resume_from_checkpoint)
        for c in candidates:
            if c and (Path(c) / STATE_FILE).is_file():
                data = torch.load(Path(c) / STATE_FILE, weights_only=True)
                if int(data.get("global_step", state.global_step)) != state.global_step:
                    raise ValueError(f"{Path(c) / STATE_FILE} is from step {data['global_step']} but the Trainer "
                                     f"resumes at step {state.global_step}; pass OwLoreCallback(resume_dir=<the "
                                     "checkpoint you resume from>)")
                if "scores" in data:
                    self.scores = data["scores"].double()
                self.active = data["active"].tolist()
                self.last_switch_step = int(data["last_switch_step"])
                chunks = [t.tolist() for t in torch.split(data["history_layers"], data["history_sizes"].tolist())]
                self.history = list(zip(data["history_steps"].tolist(), chunks, strict=True))
                logger.info("OwLore state restored from %s (active layers %s)", c, self.active)
                return data
        raise FileNotFoundError(
            f"resuming at step {state.global_step} but no {STATE_FILE} found in {[str(c) for c in candidates if c]}; "
            "the checkpoint is incomplete (interrupted while saving?) or lives elsewhere: resume from the previous "
            "checkpoint, or pass OwLoreCallback(resume_dir=<checkpoint dir>).")

    def on_train_end(self, args, state, control, **kwargs):
        self.data_parallel.close()
        if self._input_grad_hook is not None:
            self._input_grad_hook.remove()
            self._input_grad_hook = None
        self.write_record(final=True)
        if self._tb:
            self._tb.scalars(state.global_step, self.metrics())
            self._tb.close()

