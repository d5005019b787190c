"""Data parallelism for layer-switching methods: all-reduce only the gradients of the layers that train now.

``torch.nn.parallel.DistributedDataParallel`` fixes its gradient buckets when it is built: every parameter that
requires grad at that moment gets a bucket slot (an extra gradient-sized buffer) and is all-reduced at every step,
and a parameter that gets no gradient stalls the reducer unless ``find_unused_parameters=True``, which all-reduces
zeros for it. Under OwLore, LISA or BAdam the trainable set changes every K steps, so DDP would hold and send the
gradients of all L layers to train γ of them (GaLore #55, LMFlow #774).

We do not rebuild DDP at each switch (its constructor broadcasts the whole model from rank 0 and the Trainer keeps
the wrapper in a local variable); instead ``ActiveGradientReducer`` replaces it. Post-accumulate-grad hooks on every
parameter fire as gradients complete during backward; the parameters that require grad *now* are packed into
buckets (fixed by the trainable set, so identical on every rank), each bucket is all-reduced asynchronously as soon
as it and the ones before it are complete (so communication overlaps backward, and collectives are issued in the
same order on every rank), and a callback queued on the autograd engine waits for them and averages at the end of
backward, before the Trainer clips. Gradients of frozen layers neither exist nor travel. The same design as DDP's
reducer (PyTorch Distributed, VLDB 2020, arXiv 2006.15704), with the bucket plan made per trainable set.

``check_same_across_ranks`` and ``replica_digest`` let the callback verify that every rank drew the same layers and
holds the same weights and GaLore bases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_MB = 25.0
"""Bucket size, as DDP's ``bucket_cap_mb`` default."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def trainer_syncs_now() -> bool:
    """True on the micro-batch whose backward completes the accumulated gradient (accelerate's ``sync_gradients``)."""
    from accelerate.state import GradientState

    return bool(GradientState().sync_gradients)


@dataclass
class _Bucket:
    params: list[Tensor]
    numel: int
    ready: int = 0
    flat: Tensor | None = None
    work: object = None


@dataclass
class CommStats:
    """What the reducer sent: bytes of gradient all-reduced (the payload, before the ring's 2(n-1)/n factor)."""

    bytes_reduced: int = 0
    syncs: int = 0
    tensors: int = 0
    per_sync: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        last = self.per_sync[-1] if self.per_sync else 0
        return {"comm_bytes_total": float(self.bytes_reduced), "comm_syncs": float(self.syncs),
                "comm_bytes_per_sync": float(self.bytes_reduced / self.syncs) if self.syncs else 0.0,
                "comm_bytes_last_sync": float(last)}


class ActiveGradientReducer:
    """Average the gradients of the parameters that require grad across ranks, bucketed, during backward.

    Args:
        params: every parameter that may ever train, in model order (the hooks go on all of them once).
        should_sync: called at each backward's first hook; False on accumulation micro-batches (default: accelerate's
            ``sync_gradients``, which the HF Trainer sets).
        bucket_mb: bucket size in MiB.
        group: the process group (default: the world).
    """

    def __init__(self, params: Iterable[Tensor], *, should_sync: Callable[[], bool] = trainer_syncs_now,
                 bucket_mb: float = DEFAULT_BUCKET_MB, group=None) -> None:
        self.params = list(dict.fromkeys(params))  # a tied weight once
        self.should_sync = should_sync
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.group = group
        self.world = dist.get_world_size(group)
        self.stats = CommStats()
        self._plans: dict[tuple[int, ...], list[list[Tensor]]] = {}
        self._buckets: list[_Bucket] | None = None
        self._where: dict[int, int] = {}
        self._next = 0
        self._warned_missing = False
        self._handles: dict[int, object] = {}
        self.refresh()

    def refresh(self) -> None:
        """Hook the parameters that require grad now (a hook can only go on those; it stays when they freeze).
        Call after changing which parameters train; the layer-switching callback does at every switch."""
        for p in self.params:
            if p.requires_grad and id(p) not in self._handles:
                self._handles[id(p)] = p.register_post_accumulate_grad_hook(self._hook)

    def remove(self) -> None:
        for h in self._handles.values():
            h.remove()
        self._handles = {}

    # ------------------------------------------------------------------------------------------------ plan
    def plan(self) -> list[list[Tensor]]:
        """Buckets for the current trainable set: reverse model order (about the order backward finishes them),
        split by dtype/device and by size. A pure function of which parameters require grad, so every rank that
        trains the same layers gets the same buckets."""
        live = [p for p in reversed(self.params) if p.requires_grad]
        key = tuple(id(p) for p in live)
        if key not in self._plans:
            buckets: list[list[Tensor]] = []
            open_: dict[tuple, list[Tensor]] = {}
            size: dict[tuple, int] = {}
            for p in live:
                k = (p.dtype, p.device)
                if k in open_ and size[k] + p.numel() * p.element_size() > self.bucket_bytes:
                    buckets.append(open_.pop(k))
                if k not in open_:
                    open_[k], size[k] = [], 0
                open_[k].append(p)
                size[k] += p.numel() * p.element_size()
            buckets += list(open_.values())
            self._plans = {key: buckets}  # only the current set is worth keeping
        return self._plans[key]

    # ---------------------------------------------------------------------------------------------- hooks
    def _start(self) -> None:
        self._buckets = [_Bucket(list(b), sum(p.numel() for p in b)) for b in self.plan()]
        self._where = {id(p): i for i, b in enumerate(self._buckets) for p in b.params}
        self._next = 0
        torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _hook(self, p: Tensor) -> None:
        if self._buckets is None:
            if not self.should_sync():
                return
            self._start()
        i = self._where.get(id(p))
        if i is None:  # a parameter unfrozen after backward began: it was not in the plan on any rank
            return
        self._buckets[i].ready += 1
        while self._next < len(self._buckets) and \
                self._buckets[self._next].ready == len(self._buckets[self._next].params):
            self._launch(self._buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        grads = []
        for p in bucket.params:
            g = p.grad
            if g is None:
                if not self._warned_missing:
                    logger.warning("a trainable parameter of shape %s got no gradient in this backward; it is "
                                   "all-reduced as zeros (as DeepSpeed does) so that every rank sends the same "
                                   "buckets", tuple(p.shape))
                    self._warned_missing = True
                g = torch.zeros_like(p)
            grads.append((g.to_dense() if g.is_sparse else g).reshape(-1))
        flat = torch.cat(grads) if len(grads) > 1 else grads[0]
        offset = 0
        for p in bucket.params:  # the gradients become views of the bucket: the originals are freed now
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p)
            offset += n
        bucket.flat = flat
        bucket.work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.stats.bytes_reduced += flat.numel() * flat.element_size()
        self.stats.tensors += len(bucket.params)

    def _finish(self) -> None:
        buckets, self._buckets = self._buckets, None
        if buckets is None:
            return
        for b in buckets[self._next:]:  # parameters that got no gradient: send zeros, in bucket order
            self._launch(b)
        sent = 0
        for b in buckets:
            b.work.wait()
            b.flat.div_(self.world)
            sent += b.flat.numel() * b.flat.element_size()
        self.stats.syncs += 1
        self.stats.per_sync.append(sent)


# ------------------------------------------------------------------------------------------ consistency checks
def comm_device(group, default: torch.device) -> torch.device:
    """Where a small tensor must be for a collective: the current GPU under NCCL, else where it is."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else default


def gather_tensor(t: Tensor, group=None) -> list[Tensor]:
    """``all_gather`` of a small CPU tensor (any backend; moved to the backend's device and back)."""
    t = t.to(comm_device(group, t.device))
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [o.cpu() for o in out]


def broadcast_from_rank0(value: Tensor | None, like: Tensor, group=None) -> Tensor:
    """Rank 0's ``value`` on every rank (the others pass None); ``like`` gives the shape and dtype. CPU in, CPU out,
    on any backend (through the GPU for NCCL)."""
    t = (value if rank() == 0 else like).detach().to(device=comm_device(group, like.device), dtype=like.dtype)
    t = t.contiguous()
    dist.broadcast(t, src=0, group=group)
    return t.cpu()


def check_same_across_ranks(what: str, value: Tensor, *, hint: str = "", group=None) -> None:
    """Raise ``RuntimeError`` naming the ranks that disagree with rank 0 about ``value`` (same shape everywhere)."""
    if world_size() <= 1:
        return
    values = gather_tensor(value.detach().reshape(-1), group)
    bad = [r for r, v in enumerate(values) if not torch.equal(v, values[0])]
    if bad:
        shown = ", ".join(f"rank {r}: {values[r].tolist()}" for r in [0, *bad][:4])
        raise RuntimeError(f"{what} differ across ranks ({shown}){'; ' + hint if hint else ''}")


def replica_digest(tensors: Iterable[Tensor]) -> Tensor:
    """Two float64 numbers per tensor list (sum and sum of squares, in a fixed order): equal replicas give equal
    digests bit for bit, and a replica that took a different step almost surely does not."""
    parts: dict[torch.device, list[Tensor]] = {}
    for t in tensors:  # summed on each tensor's device in a fixed order; one host read per device at the end
        d = t.detach().reshape(-1)
        d = d if d.is_floating_point() else d.double()
        wide = torch.float32 if d.element_size() < 8 else None  # accumulate bf16 in fp32 without copying it
        sq = torch.linalg.vector_norm(d, dtype=wide) ** 2
        parts.setdefault(d.device, []).append(torch.stack([d.sum(dtype=torch.float64), sq.double()]))
    s = torch.zeros(2, dtype=torch.float64)
    for values in parts.values():
        s += torch.stack(values).sum(0).cpu()
    return s


def engine_of(args, model: nn.Module | None = None) -> str:
    """Which engine trains: none, ddp, deepspeed, fsdp (HF's plugin) or fsdp2 (``owlore.parallel.fsdp``, seen on the
    model's ``DTensor`` parameters)."""
    from owlore.parallel.sharded import is_sharded

    if getattr(args, "deepspeed", None) or getattr(args, "hf_deepspeed_config", None) is not None:
        return "deepspeed"
    if getattr(args, "fsdp", None):
        return "fsdp"
    if model is not None and any(is_sharded(p) for p in model.parameters()):
        return "fsdp2"
    return "ddp" if getattr(args, "world_size", 1) > 1 else "none"


def deepspeed_stage(args) -> int:
    """The ZeRO stage of the DeepSpeed config the Trainer parsed (0 without DeepSpeed)."""
    from owlore.parallel.deepspeed_config import deepspeed_config_stage

    ds = getattr(args, "hf_deepspeed_config", None)
    return (deepspeed_config_stage(ds.config)[0] or 0) if ds is not None else 0


class Replica(nn.Module):
    """The model as the Trainer's ``model_wrapped``: a wrapper that is not DDP, so the Trainer skips building DDP
    (``Trainer._wrap_model`` returns a model that is already wrapped, and ``accelerator.prepare`` then gets only the
    optimizer); ``ActiveGradientReducer`` does DDP's gradient work instead."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def install_active_gradient_sync(trainer) -> bool:
    """Before ``trainer.train()`` on several processes (no DeepSpeed/FSDP): train the layer-switching callback's
    layers data-parallel without DDP, all-reducing only the active layers' gradients. ``train.py`` and
    ``OwLoreTrainer`` call it; a stock ``Trainer`` with ``OwLoreCallback`` needs this one call. Returns whether it
    applies (False on one process, under DeepSpeed or FSDP, or without a layer-switching callback)."""
    if engine_of(trainer.args, trainer.model) == "fsdp2":  # FSDP2 reduces; only keep DDP off
        if trainer.model_wrapped is trainer.model:
            trainer.model_wrapped = Replica(trainer.model)
        return False
    dps = [c.data_parallel for c in trainer.callback_handler.callbacks
           if isinstance(getattr(c, "data_parallel", None), SwitchingDataParallel)]
    if not dps or not SwitchingDataParallel.wanted(trainer.args):
        return False
    if trainer.model_wrapped is trainer.model:
        trainer.model_wrapped = Replica(trainer.model)
    for dp in dps:
        dp.installed = True
    return True


class SwitchingDataParallel:
    """The layer-switching callback's part of data parallelism (plain ``torchrun`` / ``accelerate launch`` runs):
    the reducer (after ``install_active_gradient_sync`` kept DDP off), and the cross-rank checks."""

    def __init__(self) -> None:
        self.reducer: ActiveGradientReducer | None = None
        self.stats: CommStats | None = None
        self.installed = False

    @staticmethod
    def wanted(args, model: nn.Module | None = None) -> bool:
        return engine_of(args, model) == "ddp"

    def attach(self, model: torch.nn.Module, bucket_mb: float = DEFAULT_BUCKET_MB) -> None:
        if not self.installed:
            raise RuntimeError(
                f"{world_size()} processes without DeepSpeed/FSDP: call owlore.parallel.distributed."
                "install_active_gradient_sync(trainer) before trainer.train() (train.py and OwLoreTrainer do), so "
                "that the Trainer does not wrap the model in DDP, which would all-reduce every layer's gradient and "
                "stall on the frozen ones")
        from owlore.layerwise.checkpointing import _maybe_reentrant

        reentrant = [type(m).__name__ for m in model.modules()
                     if getattr(m, "gradient_checkpointing", None) is True and _maybe_reentrant(m)]
        if reentrant:
            raise RuntimeError(
                f"reentrant gradient checkpointing ({reentrant[0]}) with layer switching on {world_size()} "
                "processes: each checkpointed layer runs a nested backward, which ends the active-gradient "
                "reducer's round early, so every layer's gradients would be all-reduced again per segment (correct "
                "averages, ~gamma times the traffic). Use non-reentrant checkpointing: "
                "training.gradient_checkpointing_kwargs={use_reentrant: false} (train.py's default)")
        if self.reducer is None:
            self.reducer = ActiveGradientReducer(model.parameters(), bucket_mb=bucket_mb)
            self.stats = self.reducer.stats
            logger.info("data parallel over %d processes: only the active layers' gradients are all-reduced "
                        "(ActiveGradientReducer, not DDP)", world_size())

    def after_switch(self) -> None:
        if self.reducer is not None:
            self.reducer.refresh()

    def check_switch(self, step: int, layers: list[int]) -> None:
        check_same_across_ranks(
            f"decoder layers drawn at step {step}", torch.tensor(sorted(layers), dtype=torch.long),
            hint="every rank must train the same layers: give every rank the same owlore.seed / lisa.seed and the "
                 "same calibration data (the outlier ratios are compared at the start)")

    def scores_from_rank0(self, compute: Callable[[], Tensor], size: int, *, every_rank_computes: bool) -> Tensor:
        """The per-layer outlier ratios, computed on rank 0 and broadcast, so that every rank samples from the same
        distribution even where GPU kernels are not bit-reproducible (a thresholded count can flip). Over sharded
        weights (FSDP2) every rank takes part in the calibration forward and rank 0's result is kept."""
        if world_size() <= 1:
            return compute()
        scores = compute() if every_rank_computes or rank() == 0 else None
        return broadcast_from_rank0(None if scores is None else torch.as_tensor(scores, dtype=torch.float64),
                                    torch.zeros(size, dtype=torch.float64))

    def check_scores(self, scores: Tensor | None) -> None:
        if scores is not None:
            check_same_across_ranks("per-layer outlier ratios", scores.to(torch.float64),
                                    hint="every rank computes them from the same calibration batches; set "
                                         "owlore.calibration_source or pass scores= to share them")

    def metrics(self) -> dict[str, float]:
        return {} if self.stats is None else self.stats.summary()

    def close(self) -> None:
        if self.reducer is not None:
            self.reducer.remove()
            self.reducer = None


def optimizer_bases(optimizer) -> list[Tensor]:
    """The GaLore bases held by ``optimizer`` (``GaLoreAdamW`` state), in parameter order."""
    from owlore.optim.state import unwrap_optimizer

    opt = unwrap_optimizer(optimizer)
    state = getattr(opt, "state", {})
    out = []
    for group in getattr(opt, "param_groups", []):
        for p in group["params"]:
            b = state.get(p, {}).get("basis") if isinstance(state.get(p, {}), dict) else None
            if torch.is_tensor(b):
                out.append(b)
    return out


class ReplicaCheck(TrainerCallback):
    """Under data parallelism with full replicas (DDP, ``ActiveGradientReducer``, DeepSpeed ZeRO 0–2), verify at
    every checkpoint and at the end that every rank holds the same weights and, for ``GaLoreAdamW``, the same GaLore
    bases; raise if not (a silently diverged replica would train a different model on each rank). Sharded weights
    (ZeRO-3, FSDP) are not replicas and are skipped."""

    def __init__(self) -> None:
        self.model = None
        self.optimizer = None
        self.checks = 0
        self.enabled = False
        self.bases = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        engine = engine_of(args, model)
        stage = deepspeed_stage(args) if engine == "deepspeed" else 0
        self.enabled = world_size() > 1 and engine in ("ddp", "deepspeed") and stage < 3
        self.bases = stage == 0
        self.model, self.optimizer = model, optimizer

    def verify(self, step: int) -> None:
        if not self.enabled or self.model is None:
            return
        model = getattr(self.model, "module", self.model)
        check_same_across_ranks(f"model weights at step {step} (sum, sum of squares)",
                                replica_digest(p for p in model.parameters()),
                                hint="the replicas diverged: are the gradients all-reduced (one engine, not two)?")
        if self.bases and self.optimizer is not None:
            check_same_across_ranks(f"GaLore bases at step {step}", replica_digest(optimizer_bases(self.optimizer)),
                                    hint="each basis must come from the all-reduced gradient")
        self.checks += 1

    def on_save(self, args, state, control, **kwargs):
        self.verify(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.verify(state.global_step)

    def summary(self) -> dict[str, float]:
        return {"replica_checks": float(self.checks)} if self.enabled else {}


class DDPByteCounter(TrainerCallback):
    """Count the gradient bytes DDP all-reduces (a comm hook that counts each bucket, then all-reduces it as DDP's
    default does), so runs under DDP report ``comm_bytes_per_sync`` like the active-gradient reducer."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.stats = CommStats()
        self._pending = 0
        self.attached = False

    def on_train_begin(self, args, state, control, **kwargs):
        ddp = self.trainer.model_wrapped
        if not isinstance(ddp, nn.parallel.DistributedDataParallel) or self.attached:
            return
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(process_group, bucket):
            buf = bucket.buffer()
            self._pending += buf.numel() * buf.element_size()
            self.stats.tensors += len(bucket.parameters())
            return allreduce_hook(process_group, bucket)

        ddp.register_comm_hook(None, counting_hook)
        self.attached = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.attached:
            self.stats.bytes_reduced += self._pending
            self.stats.syncs += 1
            self.stats.per_sync.append(self._pending)
            self._pending = 0

    def summary(self) -> dict[str, float]:
        return self.stats.summary() if self.attached else {}
