"""``estimate(...)``: a training run's peak memory from the model's config alone, broken down and explained.

Pure arithmetic, no weights: the parameters from the architecture (``owlore.memory.shapes.ModelShape``), the
optimizer state and step temporaries per trained tensor (``owlore.memory.plan``), the bytes every op saves for
backward (``owlore.memory.shapes.layer_saved``, calibrated op by op against real HF Llama layers) and the loss's
logits. The peak is the largest of the moments of one step, each the bytes alive at that instant on top of the
weights and the optimizer state:

- ``loss (forward)``: every saved activation, the logits, their fp32 upcast and the log-softmax;
- ``loss (backward)``: the log-softmax, its gradient and the NLL gradient (three B·T·V fp32 buffers);
- ``head (backward)``: the logits' gradient, the hidden states' gradient and the head's weight gradient;
- ``backward, layer l``: the activations of the layers below l, layer l's own (recomputed if checkpointed),
  its gradient buffers, and the weight gradients accumulated so far (under ``update_in_backward`` only the one
  stepping now, plus a tied embedding's, which lives through the whole backward);
- ``embedding (backward)``: all gradients plus the embedding's dense gradient;
- ``optimizer step``: all gradients plus the update's temporaries (one tensor at a time in GaLoreAdamW, an SVD
  on basis-refresh steps; a group-wide copy in torch's foreach AdamW).

OwLore: arXiv 2405.18380 (https://arxiv.org/abs/2405.18380); GaLore: arXiv 2403.03507; the activation accounting
follows Korthikanti et al., arXiv 2205.05198, per op for HF's Llama.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from owlore.memory.plan import (
    DTYPE_BYTES,
    Counted,
    Options,
    Plan,
    Trained,
    build_plan,
    counted,
    lora_targets,
    numel_of,
)
from owlore.memory.shapes import (
    LoraShape,
    ModelShape,
    Tokens,
    head_saved,
    layer_backward_temporaries,
    layer_saved,
    load_model_shape,
)

logger = logging.getLogger(__name__)

__all__ = ["MemoryEstimate", "Options", "estimate", "estimate_run"]
CATEGORIES = ("weights", "gradients", "optimizer_state", "activations", "logits", "temporaries")
GIB = 2**30


@dataclass
class MemoryEstimate:
    """Peak bytes by category at the peak moment, the moments compared, and the items behind each category."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    temporaries: int
    total: int
    peak_moment: str
    saved_for_backward: int = 0
    """Bytes autograd holds at the end of forward: every op's saved tensors, the loss's log-softmax included."""
    host: int = 0
    """Host memory the run keeps beside the device's (frozen_int8's exact weights, offloaded states)."""
    moments: dict[str, int] = field(default_factory=dict)
    items: list[tuple[str, str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def above_weights(self) -> int:
        """The peak minus the resident weights: what a CPU run's peak RSS over the loaded model should be."""
        return self.total - self.weights

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """Markdown: the categories at the peak (GiB), then every item, then the moments compared."""
        lines = [f"Peak {self.total / GIB:.2f} GiB at **{self.peak_moment}** ({self.settings.get('summary', '')})",
                 "", "| category | GiB | item | GiB |", "|---|---:|---|---:|"]
        for cat in CATEGORIES:
            its = [(name, b) for c, name, b in self.items if c == cat and b]
            first = f"| {cat} | {getattr(self, cat) / GIB:.3f} |"
            lines += [f"{first} {its[0][0]} | {its[0][1] / GIB:.3f} |" if its else f"{first} | |"]
            lines += [f"| | | {name} | {b / GIB:.3f} |" for name, b in its[1:]]
        lines.append(f"| **total** | **{self.total / GIB:.3f}** | | |")
        if self.host:
            lines.append(f"| host (not in total) | {self.host / GIB:.3f} | | |")
        top = sorted(self.moments.items(), key=lambda kv: -kv[1])[:6]
        lines += ["", "Moments: " + "; ".join(f"{k} {v / GIB:.2f} GiB" for k, v in top)]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def _shape(model_config: Any) -> ModelShape:
    if isinstance(model_config, ModelShape):
        return model_config
    if isinstance(model_config, str):
        return load_model_shape(model_config)
    return ModelShape.from_config(model_config)


def estimate(model_config: Any, *, method: Any, dtype: str = "bfloat16", batch: int = 1, seq: int = 512,
             **options: Any) -> MemoryEstimate:
    """Peak training memory of one method on one model from its config alone.

    Args:
        model_config: a ``ModelShape``, a ``PretrainedConfig``, a ``config.json`` dict, or a model name / path
            (read with ``AutoConfig``; shipped architectures stand in offline for Llama-2-7B, Llama-3-8B,
            Mistral-7B).
        method: a registered method's name (``owlore.methods.REGISTRY``) or a ``Method``; what it trains and
            how its optimizer keeps state come from its ``MemoryProfile``.
        dtype: the weights' dtype (float32, bfloat16, float16).
        batch: sequences per micro-batch.
        seq: tokens per sequence.
        **options: the fields of ``Options`` (gamma, rank, checkpointing, chunked_loss, update_in_backward,
            embedding_state, frozen_int8, ...).

    Raises:
        ValueError: an unknown method, dtype or option, or an impossible gamma / block size.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(Options)})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; options: "
                         f"{', '.join(f.name for f in dataclasses.fields(Options))}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(DTYPE_BYTES)}")
    o = Options(**options)
    shape = _shape(model_config)
    p = DTYPE_BYTES[dtype]
    c = counted(method)
    plan, emb, head, norm = build_plan(shape, c, p, o)
    s = 2 if o.autocast else (4 if c.quantized_base else p)  # qlora: the fp32 embeddings set the stream's dtype
    tok = Tokens(batch, seq, s, attention=o.attention, mask=o.mask, device=o.device)
    est = _walk(shape, tok, plan, c, p, o, emb=emb, head=head, norm=norm)
    method = c.name
    est.settings = {"model": shape.name, "method": method, "dtype": dtype, "batch": batch, "seq": seq,
                    **{k: v for k, v in dataclasses.asdict(o).items() if v != getattr(Options, k, None)},
                    "summary": f"{method}, {shape.name}, {dtype}, batch {batch} x seq {seq}"}
    logger.debug("estimate %s: %.2f GiB at %s", est.settings["summary"], est.total / GIB, est.peak_moment)
    return est


@dataclass
class _Saved:
    """What forward leaves for backward: per decoder layer as run (``kept``) and when recomputed (``full``)."""

    full: list[int]
    kept: list[int]
    small: int
    """rope cos/sin, the embedding's indices, the final norm's and the head's inputs."""
    below: int
    """The part of ``small`` still alive while the decoder layers run backward (rope, indices)."""
    log_softmax: int
    lowest: int


def _saved(shape: ModelShape, tok: Tokens, plan: Plan, o: Options, lora: LoraShape | None, *, emb: bool,
           head: bool, norm: bool) -> _Saved:
    lowest = next((i for i, r in enumerate(plan.roles) if r != "none"), shape.layers)
    ckpt = [r != "none" and (o.checkpointing == "all" or (o.checkpointing == "frozen" and r == "frozen"))
            for r in plan.roles]
    full = [sum(layer_saved(shape, tok, role=r, input_grad=emb or i > lowest, lora=lora).values())
            for i, r in enumerate(plan.roles)]
    kept = [tok.act_bytes * tok.n * shape.hidden if c else a for a, c in zip(full, ckpt)]
    if o.offload_activations:  # the checkpointed inputs wait on the host; each comes back for its own recompute
        plan.host["checkpointed layer inputs (memory.offload_activations)"] = sum(k for k, c in zip(kept, ckpt) if c)
        kept = [0 if c else k for k, c in zip(kept, ckpt)]
    below = (2 * tok.seq * shape.head_dim * tok.act_bytes if lowest < shape.layers else 0) + (8 * tok.n if emb else 0)
    hs = head_saved(shape, tok, norm_trained=norm, head_trained=head, chunked=bool(o.chunked_loss))
    return _Saved(full, kept, below + hs["final_norm"] + hs["head_in"], below, hs["log_softmax"], lowest)


def _moments(shape: ModelShape, tok: Tokens, plan: Plan, sv: _Saved, o: Options, *, p: int, sl: int,
             head: bool, emb: bool, dequant: int, cast: int) -> dict[str, tuple[int, int, int, int]]:
    """name -> (gradients, activations, logits, temporaries) alive at that moment of one step."""
    n, V, d, s = tok.n, shape.vocab, shape.hidden, tok.act_bytes
    acts = sum(sv.kept) + sv.small
    g_all = sum(t.grad for t in plan.trained)
    g_prev = g_all if o.gradient_accumulation > 1 else 0  # gradients of the earlier micro-batches
    tied_grad = next((t.grad for t in plan.trained if t.name.startswith("embedding (tied")), 0)
    head_grad = sum(t.grad for t in plan.trained if t.layer is None and t.name != "embedding")
    step_temp = max((t.step_temp for t in plan.trained), default=0)
    out: dict[str, tuple[int, int, int, int]] = {}
    if o.chunked_loss:
        cv, cast16 = min(o.chunked_loss, n) * V, sl if sl != 4 else 0
        # forward: a chunk's fp32 logits, logsumexp's (x - max) and exp(); backward: the recomputed logits turned
        # into their gradient in place (and 16-bit casts), the fp32 weight-gradient accumulator, grad_hidden
        acc = 4 * V * d + (V * d * sl if sl != 4 else 0) if head else 0
        out["loss (forward)"] = (g_prev, acts, sv.log_softmax, cv * (12 + cast16) + cast)
        out["loss (backward)"] = (g_prev, acts, sv.log_softmax, cv * (4 + cast16) + acc + n * d * s + cast)
    else:
        out["loss (forward)"] = (g_prev, acts, n * V * (sl + 4 + (4 if sl != 4 else 0)), cast)
        out["loss (backward)"] = (g_prev, acts, 3 * 4 * n * V, cast)  # log-softmax, its and the NLL's gradients
        cast_back = (4 + sl) * n * V if sl != 4 else 0
        out["head (backward)"] = (g_prev + head_grad, acts, max(cast_back, sl * n * V), n * d * s + cast)
    done = tied_grad if o.update_in_backward else head_grad
    for i in range(shape.layers - 1, sv.lowest - 1, -1):
        temps = layer_backward_temporaries(shape, tok) + dequant + cast
        mine = [t for t in plan.trained if t.layer == i]
        if o.update_in_backward:
            g = tied_grad + max((t.grad for t in mine), default=0)
            temps += max((t.step_temp for t in mine), default=0)
        else:
            done += sum(t.grad for t in mine)
            g = max(done, g_prev)
        out[f"backward, layer {i}"] = (g, sv.below + sum(sv.kept[:i]) + sv.full[i], 0, temps)
    if emb:  # the embedding's dense gradient (added into a tied one)
        g = tied_grad if o.update_in_backward else g_all
        out["embedding (backward)"] = (g + (V * d * p if shape.tied else 0), sv.below, 0,
                                       step_temp if o.update_in_backward else 0)
    if not o.update_in_backward:
        out["optimizer step"] = (g_all, 0, 0, step_temp + plan.group_temp)
    return out


def _walk(shape: ModelShape, tok: Tokens, plan: Plan, c: Counted, p: int, o: Options, *, emb: bool,
          head: bool, norm: bool) -> MemoryEstimate:
    """Bytes alive at each moment of one step; the largest is the peak."""
    lora = LoraShape(o.lora_rank, lora_targets(o.lora_targets), o.lora_dropout, 4) if c.adapters else None
    sv = _saved(shape, tok, plan, o, lora, emb=emb, head=head, norm=norm)
    dequant = max(m * k for m, k in shape.linear_shapes().values()) * (p if c.quantized_base else tok.act_bytes) \
        if c.quantized_base or o.frozen_int8 else 0  # one frozen linear's weight, dequantised for its matmul
    cast = 2 * sum(numel_of(t.shape) for t in plan.trained if len(t.shape) == 2 and t.layer is not None) \
        if o.autocast else 0  # autocast caches a 16-bit copy of each trained weight from forward to backward
    moments = _moments(shape, tok, plan, sv, o, p=p, sl=4 if c.quantized_base else p, head=head, emb=emb,
                       dequant=dequant, cast=cast)
    weights = sum(plan.weights.values())
    state = sum(t.state for t in plan.trained) + plan.inactive_state
    totals = {k: weights + state + sum(v) for k, v in moments.items()}
    peak = max(totals, key=totals.get)
    g, a, lg, tmp = moments[peak]
    return MemoryEstimate(weights=weights, gradients=g, optimizer_state=state, activations=a, logits=lg,
                          temporaries=tmp, total=totals[peak], peak_moment=peak, host=sum(plan.host.values()),
                          moments=totals, items=_items(plan, sv, g, a, lg, tmp), notes=list(plan.notes),
                          saved_for_backward=sum(sv.kept) + sv.small + sv.log_softmax)


def _items(plan: Plan, sv: _Saved, g: int, a: int, lg: int, tmp: int) -> list[tuple[str, str, int]]:
    """Each category's parts at the peak (the parts when all of it is alive, else what is alive)."""
    items = [("weights", k, v) for k, v in plan.weights.items()]
    g_all = sum(t.grad for t in plan.trained)
    items += _grouped("gradients", plan.trained, "grad") if g == g_all else [
        ("gradients", f"alive at this moment (of {g_all / GIB:.3f} GiB in all)", g)]
    items += _grouped("optimizer_state", plan.trained, "state")
    items.append(("optimizer_state", "states of inactive layers (state_policy=keep)", plan.inactive_state))
    if a == sum(sv.kept) + sv.small:
        roles = {r: sum(k for k, rr in zip(sv.kept, plan.roles) if rr == r) for r in ("trained", "frozen", "lora")}
        items += [("activations", f"{r} layers ({plan.roles.count(r)})", b) for r, b in roles.items() if b]
        items.append(("activations", "final norm + head input + rope", sv.small))
    else:
        items.append(("activations", "layers below this one, and this one's (recomputed if checkpointed)", a))
    items += [("logits", "logits / log-softmax / their gradients", lg), ("temporaries", "at this moment", tmp)]
    return items


def _grouped(category: str, trained: list[Trained], attr: str) -> list[tuple[str, str, int]]:
    layers = [t for t in trained if t.layer is not None]
    out = [(category, f"decoder layers ({len({t.layer for t in layers})})", sum(getattr(t, attr) for t in layers))]
    return out + [(category, t.name, getattr(t, attr)) for t in trained if t.layer is None]


def run_options(cfg: Any) -> tuple[str, int, int, dict[str, Any]]:
    """(dtype, batch, seq, options) of ``estimate`` for an ``owlore.run.recipe.RunConfig``: the common sections here,
    the memory options' from their declarations (``MemoryOption.estimate``), the method's own from its
    ``MemoryProfile.options``."""
    from owlore.memory.options import estimator_options
    from owlore.methods import get_method

    t, m = cfg.training, cfg.model
    sections = cfg.sections
    dtype = m.dtype if m.dtype in DTYPE_BYTES else "bfloat16"
    opts: dict[str, Any] = {
        **estimator_options(cfg), "attention": m.attn_implementation or "sdpa", "mask": not cfg.data.packing,
        "autocast": dtype == "float32" and bool(t.get("bf16") or t.get("fp16")),
        "gradient_accumulation": int(t.get("gradient_accumulation_steps", 1)),
        "device": "cpu" if t.get("use_cpu") else "cuda", "optim": str(t.get("optim", "adamw_torch_fused"))}
    profile = get_method(cfg.method).memory
    if profile.options is not None:
        opts.update(profile.options(cfg))
    optimizer = sections.get("optimizer")
    if optimizer is not None:
        opts.update(state_bits=optimizer.state_bits, state_dtype=optimizer.state_dtype,
                    master_weights=optimizer.master_weights, update_in_backward=optimizer.update_in_backward,
                    embedding_state=getattr(optimizer, "embedding_state", "full"),
                    embedding_rank=getattr(optimizer, "embedding_rank", 128))
    return dtype, int(t.get("per_device_train_batch_size", 8)), cfg.data.max_seq_length, opts


def estimate_run(run_config: Any, **overrides: Any) -> MemoryEstimate:
    """``estimate`` for a loaded run config (``owlore.run.recipe.load_config``); ``overrides`` replace options
    (and ``dtype``, ``batch``, ``seq``).

    The model's shape comes from its ``config.json`` or, offline, from a shipped architecture; memory options
    with an ``adjust`` (plugins) change the result last.
    """
    dtype, batch, seq, opts = run_options(run_config)
    shape = load_model_shape(run_config.model.name, trust_remote_code=run_config.model.trust_remote_code)
    dtype, batch, seq = (overrides.pop(k, v) for k, v in (("dtype", dtype), ("batch", batch), ("seq", seq)))
    est = estimate(shape, method=run_config.method, dtype=dtype, batch=batch, seq=seq, **{**opts, **overrides})
    from owlore.memory.options import adjust_estimate

    adjust_estimate(est, run_config)  # options the arithmetic does not model change the estimate themselves
    return est

