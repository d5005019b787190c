"""Fine-tune a causal LM with any registered method (OwLore, full, LoRA, QLoRA, GaLore, LISA, BAdam) from YAML.

    python train.py --config configs/smollm2_owlore.yaml [section.key=value ...]
    python train.py --config configs/llama2_7b.yaml --config configs/paper/lora.yaml
    python train.py --config configs/smollm2.yaml method=lisa lisa.gamma=2      # the base file has no method section

A config has ``method:`` (default owlore), the sections ``model``, ``data``, ``training``
(``transformers.TrainingArguments``), ``eval``, ``memory`` (``owlore/memory/options.py``), and the method's own (``owlore``, ``lora``, ``galore``, ``lisa``,
``badam``, ``quantization``, ``optimizer``); see ``owlore/run/recipe.py``. Overrides are YAML values read against the
field's type: ``owlore.gamma=2``, ``training.max_steps=5``, ``training.resume_from_checkpoint=last``.
The method builds the model wrapper, optimizer and callbacks (``owlore/methods/``); this script hands them to a
stock ``transformers.Trainer``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owlore.cli import entry_point, exit_code
from owlore.run.config import ConfigError
from owlore.run.recipe import OWLORE_TRAINING_KEYS, RunConfig, load_config, preflight

logger = logging.getLogger("train")


def load_model_and_tokenizer(cfg, **load_kwargs: Any):
    """Tokenizer and causal LM from a hub id, a local directory or the embedded model's name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from owlore.assets import resolve_model_name

    name = resolve_model_name(cfg.name)
    dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    kw = {"trust_remote_code": cfg.trust_remote_code, **load_kwargs}
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)
    return model, tokenizer


def run_eval(model, tokenizer, cfg: RunConfig, when: str) -> dict[str, Any]:
    from owlore.evaluation import evaluate

    out = {}
    if cfg.eval.demo:
        out["demo"] = evaluate(model, tokenizer, suite="demo", limit=cfg.eval.demo_limit,
                               batch_size=cfg.eval.batch_size)
    if when == "after" and cfg.vision.enabled and cfg.vision.eval_examples:  # held-out grid questions, unpruned
        from owlore.data.fashion_vqa import as_records, heldout_examples
        from owlore.pruning.accuracy import vqa_accuracy
        from owlore.vision.llava import llava_processor

        examples = heldout_examples(cfg.vision.eval_examples, grid=cfg.vision.grid, seed=cfg.vision.seed,
                                    data_dir=cfg.vision.data_dir)
        r = vqa_accuracy(model, llava_processor(model.config, tokenizer), as_records(examples),
                         batch_size=cfg.eval.batch_size, scoring="first-token")  # the benchmark's scoring
        out["vqa"] = {"average": r["accuracy"], "n": r["n"], "by_kind": r["by_kind"]}
    out.update(_task_evals(model, tokenizer, cfg.eval))
    if when == "after":
        for suite in cfg.eval.suites:
            shots = cfg.eval.shots if cfg.eval.shots is not None else (5 if suite == "mmlu" else 0)
            out[suite] = evaluate(model, tokenizer, suite=suite, data_dir=cfg.eval.data_dir, shots=shots,
                                  split=cfg.eval.mmlu_split if suite == "mmlu" else "test", limit=cfg.eval.limit,
                                  batch_size=cfg.eval.batch_size)
    return out


def _task_evals(model, tokenizer, ev) -> dict[str, Any]:
    """The real-task scores of ``eval.answers`` (generation) and ``eval.perplexity`` sets, keyed ``answers:<name>``
    and ``perplexity:<name>``."""
    from owlore.data.sft import load_rows
    from owlore.evaluation.answers import evaluate_answers
    from owlore.evaluation.perplexity import perplexity

    out: dict[str, Any] = {}
    for name, path in ev.answers.items():
        out[f"answers:{name}"] = evaluate_answers(model, tokenizer, load_rows(path), limit=ev.answers_limit,
                                                  max_new_tokens=ev.max_new_tokens, batch_size=2 * ev.batch_size)
    for name, path in ev.perplexity.items():
        out[f"perplexity:{name}"] = perplexity(model, tokenizer, load_rows(path), seq_len=ev.perplexity_seq,
                                               limit=ev.perplexity_limit, batch_size=ev.batch_size)
    return out


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


@entry_point
def main(argv: list[str]) -> dict[str, Any] | int:
    """The run's summary; 130 / 143 when SIGINT / SIGTERM stopped it at a checkpoint (``owlore.run.interrupt``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, action="append",
                        help="YAML file, e.g. configs/smollm2_owlore.yaml; repeat to compose (later files win)")
    parser.add_argument("overrides", nargs="*", help="section.key=value (YAML value) or method=NAME")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    cfg = load_config(args.config, args.overrides)
    preflight(cfg)  # needs only the model's config.json
    summary = run(cfg)
    if "interrupted" in summary:  # a signal stopped it at a checkpoint: say where, and how to go on
        stop = summary["interrupted"]
        again = [a for a in argv if not a.startswith(("training.resume_from_checkpoint=", "resume_from_checkpoint="))]
        print(f"stopped by {stop['signal']} at step {stop['step']}; checkpoint: {stop['checkpoint']}. Resume with: "
              f"python train.py {shlex.join(again)} training.resume_from_checkpoint=last", file=sys.stderr)
        return stop["exit_code"]
    return summary


def training_arguments(cfg: RunConfig):
    """``TrainingArguments`` from the ``training`` section (machine-dependent errors become a ConfigError)."""
    import dataclasses

    from transformers import TrainingArguments

    training = dict(cfg.training)
    training.pop("resume_from_checkpoint", None)
    for ours in OWLORE_TRAINING_KEYS:  # read by train.py itself (owlore.run.output_dir, owlore.run.resume)
        training.pop(ours, None)
    from owlore.memory.options import checkpointing_enabled

    if checkpointing_enabled(cfg):  # newer transformers call it activation_checkpointing (old name: an alias)
        names = {f.name for f in dataclasses.fields(TrainingArguments)}
        new = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        for suffix, default in (("", True), ("_kwargs", {"use_reentrant": False})):
            if all(training.get(n + suffix) is None for n in {new, "gradient_checkpointing"}):  # the user's wins
                training[new + suffix] = default
    try:  # value checks that depend on the machine (e.g. bf16 on a CPU) happen here, not in load_config
        return TrainingArguments(**training)
    except (ValueError, TypeError, ImportError) as e:
        raise ConfigError(f"training: {str(e).strip().splitlines()[0]}") from e


@dataclass
class Run:
    """One training run as it goes through the steps of ``run``; each step fills in its part."""

    cfg: RunConfig
    method: Any
    out_dir: Path
    settings: dict[str, Any]
    """The method and its settings: what a checkpoint's manifest records and a resume must match."""
    resume: str | None
    args: Any
    """``transformers.TrainingArguments``."""
    t_start: float = field(default_factory=time.perf_counter)
    model: Any = None
    tokenizer: Any = None
    train_ds: Any = None
    collator: Any = None
    rss_after_load: int | None = None
    alignment: dict[str, Any] | None = None
    before: dict[str, Any] = field(default_factory=dict)
    parts: Any = None
    memory_callbacks: list[Any] = field(default_factory=list)
    trainer: Any = None
    timer: Any = None
    """``StepTimer``: step times and the peak before training."""
    stop: Any = None
    """``StopOnSignal``: set when SIGINT / SIGTERM asked for a checkpoint and a stop."""
    replica_check: Any = None
    ddp_bytes: Any = None


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train one run: the steps below, in order. Returns the summary (or, stopped by a signal, where it stopped)."""
    r = start(cfg)
    load(r)
    build(r)
    make_trainer(r)
    result, seconds = train_steps(r)
    if r.stop.received is not None:
        return interrupted(r)
    after = run_eval(r.parts.model, r.tokenizer, cfg, "after") if evaluates_here(cfg, r.args, "after") else {}
    summary = summarize(r, result, seconds, after)
    write_outputs(r, summary, after)
    return summary


def start(cfg: RunConfig) -> Run:
    """Before anything loads: the checkpoint to resume (verified, same settings), the output directory claimed
    (an earlier run's results are never replaced by accident), the Trainer's arguments, the seed."""
    from transformers.trainer_utils import set_seed

    from owlore.methods import get_method
    from owlore.run.output_dir import claim_output_dir
    from owlore.run.resume import choose_checkpoint, run_settings

    out_dir = Path(cfg.training["output_dir"])
    settings = run_settings(cfg.method, cfg.sections)
    resume = choose_checkpoint(out_dir, cfg.training.get("resume_from_checkpoint"), settings,
                               allow_changes=bool(cfg.training.get("resume_allow_changes")))
    try:
        claim_output_dir(out_dir, resume=bool(cfg.training.get("resume_from_checkpoint")),
                         overwrite=bool(cfg.training.get("overwrite_output_dir")),
                         main_process=int(os.environ.get("RANK", "0")) == 0)
    except FileExistsError as e:
        raise ConfigError(str(e)) from None
    args = training_arguments(cfg)
    if args.process_index != 0:  # one log under torchrun / accelerate launch / deepspeed
        logging.getLogger().setLevel(logging.WARNING)
    args.resume_from_checkpoint = resume  # the layer-switching callback restores its state from here
    if cfg.vision.enabled:  # the collator needs each example's image, which the Trainer would drop as "unused"
        args.remove_unused_columns = False
    set_seed(args.seed)
    return Run(cfg, get_method(cfg.method), out_dir, settings, resume, args)


def load(r: Run) -> None:
    """Data first (bad rows fail before any weights load), then the model on this process's device, the
    tokenised training set, and the "before" evaluation."""
    from transformers import DataCollatorForSeq2Seq

    from owlore.data.sft import load_rows, tokenize_rows, vet_rows
    from owlore.run.metrics import rss_after_touch

    cfg = r.cfg
    load_kwargs = r.method.model_kwargs(cfg) if r.method.model_kwargs else {}
    if cfg.vision.enabled:  # a LLaVA on Fashion-MNIST grid questions (owlore.vision.llava)
        r.model, r.tokenizer, r.train_ds, r.collator, r.rss_after_load, r.alignment = _vision_model_and_data(
            cfg, load_kwargs, r.args)
    else:
        rows = load_rows(cfg.data.train, split=cfg.data.split, limit=cfg.data.limit)
        if not cfg.data.skip_bad_rows:
            vet_rows(rows)
        r.model, r.tokenizer = load_model_and_tokenizer(cfg.model, **load_kwargs)
        place_for_setup(r.model, r.args)
        r.rss_after_load = rss_after_touch(r.model)  # weights resident: the baseline for memory above the model
        r.train_ds = tokenize_rows(rows, r.tokenizer, max_seq_length=cfg.data.max_seq_length,
                                   packing=cfg.data.packing, skip_bad_rows=cfg.data.skip_bad_rows)
        r.collator = DataCollatorForSeq2Seq(r.tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)
    logger.info("method %s: training on %d examples from %s", cfg.method, len(r.train_ds), cfg.data.train)
    if not r.resume and cfg.eval.before and evaluates_here(cfg, r.args, "before"):
        r.before = run_eval(r.model, r.tokenizer, cfg, "before")


def build(r: Run) -> None:
    """FSDP2 shards (before the optimizer exists, so that it holds them), the method's parts (model wrapper,
    optimizer, callbacks), the memory options, and visual-token pruning during training (after the memory options:
    it wraps the chunked loss's forward)."""
    from owlore.memory.options import apply_memory_options
    from owlore.methods import BuildContext

    cfg = r.cfg
    if cfg.parallel.fsdp2:
        from owlore.parallel.fsdp import shard_model

        if r.args.world_size < 2:
            raise ConfigError("parallel.fsdp2=true needs several processes: torchrun --nproc_per_node N train.py ...")
        shard_model(r.model, layers_path=_layers_path(cfg), reshard_after_forward=cfg.parallel.reshard_after_forward)
    r.parts = r.method.build(BuildContext(model=r.model, config=cfg, args=r.args, tokenizer=r.tokenizer))
    r.memory_callbacks = apply_memory_options(r.parts, cfg)
    if cfg.pruning.method:
        from owlore.pruning import VisualTokenPruner
        from owlore.pruning.training import enable_training_pruning

        keep = int(cfg.pruning.keep) if cfg.pruning.keep >= 1 else cfg.pruning.keep
        enable_training_pruning(r.parts.model, VisualTokenPruner(cfg.pruning.method, keep, seed=cfg.pruning.seed,
                                                                 num_directions=cfg.pruning.num_directions))
        logger.info("training with visual-token pruning: %s, keep %s per image", cfg.pruning.method, keep)
    if cfg.vision.enabled and r.parts.layer_callback is not None:  # the from-scratch tower trains with the layers
        r.parts.layer_callback.config.train_vision = cfg.vision.train_tower


def make_trainer(r: Run) -> None:
    """The stock ``transformers.Trainer`` (``KeepOptimizerTrainer``) with the callbacks in the order they must
    run, OwLore's data-parallel replacement for DDP under layer switching, and checkpoint manifests last."""
    from owlore.parallel.distributed import DDPByteCounter, ReplicaCheck, install_active_gradient_sync
    from owlore.run.interrupt import StopOnSignal
    from owlore.run.metrics import StepTimer
    from owlore.run.resume import ManifestCallback
    from owlore.trainer import KeepOptimizerTrainer

    timer = StepTimer()  # first, so a layer switch in a method callback's on_step_begin is timed with its step
    stop = StopOnSignal()  # before the method's callbacks: they save their state when it asks for a checkpoint
    replica_check = ReplicaCheck()  # several processes: the replicas must stay equal (a no-op on one)
    r.trainer = KeepOptimizerTrainer(model=r.parts.model, args=r.args, train_dataset=r.train_ds,
                                     data_collator=r.collator, processing_class=r.tokenizer,
                                     optimizers=(r.parts.optimizer, None),
                                     callbacks=[timer, stop, *r.parts.callbacks, *r.memory_callbacks, replica_check])
    _report_before_loggers(r.trainer)
    install_active_gradient_sync(r.trainer)  # layer switching on several processes: no DDP (owlore.parallel.distributed)
    ddp_bytes = DDPByteCounter(r.trainer)  # the other methods under DDP: count what it all-reduces
    r.trainer.add_callback(ddp_bytes)
    r.trainer.add_callback(ManifestCallback(r.settings))  # last: after every other callback's checkpoint files
    r.timer, r.stop, r.replica_check, r.ddp_bytes = timer, stop, replica_check, ddp_bytes


def train_steps(r: Run) -> tuple[Any, float]:
    """``trainer.train`` (resuming if asked), with the signal handlers put back afterwards; (result, seconds)."""
    t_train = time.perf_counter()
    try:
        result = r.trainer.train(resume_from_checkpoint=r.resume)
    finally:
        r.stop.restore()
    return result, time.perf_counter() - t_train


def interrupted(r: Run) -> dict[str, Any]:
    """A signal stopped the run at a checkpoint: no final model, record or "after" scores; where it stopped."""
    from owlore.run.interrupt import exit_code
    from owlore.run.output_dir import PARTIAL_RECORD_FILE, RECORD_FILE

    stop, step = r.stop, r.trainer.state.global_step
    if r.trainer.is_world_process_zero() and (r.out_dir / RECORD_FILE).is_file():  # the callback's end-of-train
        os.replace(r.out_dir / RECORD_FILE, r.out_dir / PARTIAL_RECORD_FILE)  # record: not a finished run's
    return {"method": r.cfg.method, "optimizer_steps": step, "interrupted": {
        "signal": signal.Signals(stop.received).name, "step": step, "exit_code": exit_code(stop.received),
        "checkpoint": str(r.out_dir / f"checkpoint-{step}")}}


def summarize(r: Run, result: Any, train_seconds: float, after: dict[str, Any]) -> dict[str, Any]:
    """The run's summary: loss, steps, time, memory, optimizer state, evaluations, and each callback's figures."""
    from owlore.optim.state import state_bytes
    from owlore.parallel.sharded import is_sharded
    from owlore.run.metrics import peak_memory_bytes

    cfg, trainer, timer, cb = r.cfg, r.trainer, r.timer, r.parts.layer_callback
    steps = trainer.state.global_step - (trainer._initial_global_step or 0)
    summary = {
        "method": cfg.method,
        "train_loss": result.training_loss,
        "optimizer_steps": trainer.state.global_step,
        "train_seconds": train_seconds,
        "steps_per_second": steps / train_seconds if train_seconds > 0 else None,
        "peak_memory_bytes": max(timer.peak_before_train or 0, peak_memory_bytes()),  # the timer resets the peak
        "rss_after_load_bytes": r.rss_after_load,
        **timer.summary(),
        "log_losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "optimizer_state_bytes": state_bytes(trainer.optimizer),
        "trainable_parameters": sum(p.numel() for p in r.parts.model.parameters() if p.requires_grad),
        "wall_seconds": time.perf_counter() - r.t_start,
        "eval_before": r.before,
        "eval_after": after,
        "model_dir": str(r.out_dir / "final"),
    }
    if r.alignment is not None:
        summary["vision_alignment"] = r.alignment
    if cfg.pruning.method:
        summary["training_pruning"] = {"method": cfg.pruning.method, "keep": cfg.pruning.keep}
    summary["world_size"] = r.args.world_size
    summary["sharded_parameters"] = sum(is_sharded(p) for p in trainer.model.parameters())  # FSDP2 DTensors
    for extra in [*r.memory_callbacks, r.replica_check, r.ddp_bytes]:
        if hasattr(extra, "summary"):
            summary.update(extra.summary())
    if cb is not None:
        summary.update(cb.data_parallel.metrics())  # bytes the active-gradient reducer all-reduced
        summary["layers_sampled"] = sorted({i for _, ls in cb.history for i in ls})
    return summary


def write_outputs(r: Run, summary: dict[str, Any], after: dict[str, Any]) -> None:
    """``final/`` (the model, or a peft adapter), and on the main process the per-layer plot, the record
    (atomically; the partial record goes), the evaluation files and the printed summary."""
    from owlore.layerwise.plotting import layer_table, plot_layer_statistics
    from owlore.run.fileio import atomic_write
    from owlore.run.metrics import OwLoreLogger, owlore_tensorboard_dir
    from owlore.run.output_dir import PARTIAL_RECORD_FILE, RECORD_FILE

    cfg, trainer, cb, out_dir = r.cfg, r.trainer, r.parts.layer_callback, r.out_dir
    final_dir = out_dir / "final"
    trainer.save_model(str(final_dir))  # a peft model saves its adapter (the Trainer writes on rank 0 only)
    if not trainer.is_world_process_zero():
        return
    r.tokenizer.save_pretrained(final_dir)
    if cfg.vision.enabled:  # the processor: any VLM tool (eval/vlm_pruning.py, lmms-eval) then runs it as trained
        from owlore.vision.llava import llava_processor

        llava_processor(r.model.config, r.tokenizer).save_pretrained(final_dir)
    record = cb.record() if cb is not None else {}
    if cb is not None:
        summary["plot"] = str(plot_layer_statistics(
            out_dir / "layers.png", record["outlier_ratios"], record["inclusion_probabilities"],
            record["activation_counts"], title=f"{cfg.method} on {cfg.model.name}"))
        logger.info("per-layer statistics:\n%s", layer_table(record["outlier_ratios"],
                                                              record["inclusion_probabilities"],
                                                              record["activation_counts"]))
    text = json.dumps({"method": cfg.method, "sources": cfg.sources, **record, "summary": summary}, indent=1,
                      default=str)
    atomic_write(out_dir / RECORD_FILE, lambda tmp: Path(tmp).write_text(text))
    (out_dir / PARTIAL_RECORD_FILE).unlink(missing_ok=True)
    _write_evals(r.before, after, out_dir, trainer.state.global_step,
                 OwLoreLogger(owlore_tensorboard_dir(out_dir)) if "tensorboard" in (r.args.report_to or []) else None)
    _print_summary(summary, r.before, after, cb, final_dir, out_dir / RECORD_FILE)


def place_for_setup(model, training_args) -> None:
    """Move the model to this process's device (``cuda:LOCAL_RANK`` under torchrun) before the work done ahead of
    the Trainer: vision alignment, the "before" evaluation and FSDP2 sharding would otherwise all run on the CPU
    weights. The Trainer would make the same move later. Left alone: DeepSpeed (it places and partitions the
    model itself) and models loaded with a ``device_map`` (QLoRA's 4-bit weights are already on their GPU)."""
    if training_args.deepspeed or getattr(model, "hf_device_map", None):
        return
    model.to(training_args.device)


def evaluates_here(cfg: RunConfig, training_args, when: str) -> bool:
    """Whether this process runs the ``when`` evaluation: the main process only (the others would repeat the same
    work and their results are discarded), except over sharded weights (ZeRO-3, FSDP2 after training), whose
    forward needs every rank. The other ranks wait for rank 0 at their next collective, within
    ``training.ddp_timeout`` (1800 s by default): raise it for a long evaluation of a big model."""
    from owlore.parallel.deepspeed_config import deepspeed_config_stage

    if training_args.world_size < 2:
        return True
    stage = deepspeed_config_stage(training_args.deepspeed)[0] if training_args.deepspeed else 0
    sharded = stage == 3 or (cfg.parallel.fsdp2 and when == "after")
    return sharded or training_args.process_index == 0


def _vision_model_and_data(cfg: RunConfig, load_kwargs: dict[str, Any], training_args):
    """The LLaVA around the configured language model (on this process's device), its training questions and
    collator."""
    import functools

    from owlore.data.fashion_vqa import load_fashion_mnist
    from owlore.run.metrics import rss_after_touch
    from owlore.vision.llava import build_llava, collate, vqa_features

    load_fashion_mnist("train", cfg.vision.data_dir)  # missing images fail before any weights load
    lm, tokenizer = load_model_and_tokenizer(cfg.model, **load_kwargs)
    model, tokenizer = build_llava(lm, tokenizer, cfg.vision, seed=cfg.vision.seed)  # a VisionConfig is a tower config
    del lm
    place_for_setup(model, training_args)  # alignment trains on the accelerator, not on the CPU
    alignment = None
    if cfg.vision.align_steps:  # tower + projector read like class words before the LM sees them (owlore.vision.align)
        from owlore.vision.align import align_vision

        images, labels = load_fashion_mnist("train", cfg.vision.data_dir)
        alignment = align_vision(model, tokenizer, images, labels, grid=cfg.vision.grid, steps=cfg.vision.align_steps,
                                 batch_size=cfg.vision.align_batch_size, lr=cfg.vision.align_lr, seed=cfg.vision.seed,
                                 heldout=load_fashion_mnist("test", cfg.vision.data_dir))
    if cfg.vision.freeze_language_model:
        for p in model.model.language_model.parameters():
            p.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    elif not cfg.vision.train_tower:
        for module in (model.model.vision_tower, model.model.multi_modal_projector):
            module.requires_grad_(False)
    rss = rss_after_touch(model)
    train_ds = vqa_features(tokenizer, cfg.vision, split="train")
    return model, tokenizer, train_ds, functools.partial(collate, pad_id=tokenizer.pad_token_id), rss, alignment


def _layers_path(cfg: RunConfig) -> str | None:
    for section in cfg.sections.values():
        if getattr(section, "layers_path", None):
            return section.layers_path
    return None


def _report_before_loggers(trainer) -> None:
    """Move callbacks that correct logged values (the in-backward optimizer's ``grad_norm``) in front of the
    Trainer's reporters (TensorBoard, wandb), which the Trainer puts first."""
    from owlore.memory.in_backward import InBackwardGradNorm

    handler = trainer.callback_handler
    for cb in [c for c in handler.callbacks if isinstance(c, InBackwardGradNorm)]:
        handler.callbacks.remove(cb)
        handler.callbacks.insert(0, cb)


def _write_evals(before: dict, after: dict, out_dir: Path, step: int, tb) -> None:
    from owlore.evaluation import save_results

    for when, res in (("before", before), ("after", after)):
        for suite, r in res.items():
            save_results(r, out_dir / f"eval_{suite.replace(':', '_')}_{when}.json")
            if tb and r.get("average") is not None:
                tb.scalars(step, {f"eval/{suite}_{when}": r["average"]})
    if tb:
        tb.close()


def _print_summary(summary: dict, before: dict, after: dict, cb, final_dir: Path, record_path: Path) -> None:
    rows = [("method", summary["method"]), ("train loss", f"{summary['train_loss']:.4f}"),
            ("optimizer steps", str(summary["optimizer_steps"])), ("steps/s", f"{summary['steps_per_second']:.3f}"),
            ("train time", f"{summary['train_seconds']:.0f} s"),
            ("wall time (load+eval+train)", f"{summary['wall_seconds']:.0f} s"),
            ("peak memory (RSS/CUDA)", f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB"),
            ("optimizer state at the end", f"{summary['optimizer_state_bytes'] / 2**20:.1f} MiB"),
            ("trainable parameters at the end", f"{summary['trainable_parameters']:,}")]
    if cb is not None:
        rows.append(("distinct layers trained", f"{len(summary['layers_sampled'])} of {len(cb.layers)}"))
    for suite in after:
        b = before.get(suite, {}).get("average")
        a = after[suite].get("average")
        what = ("ROUGE-L" if suite.startswith("answers:") else "perplexity" if suite.startswith("perplexity:")
                else "accuracy")
        rows.append((f"{suite} {what} (before -> after)", f"{b:.3f} -> {a:.3f}" if b is not None else f"{a:.3f}"))
    print("\n" + summary_table(rows))
    for suite, res in after.items():
        if suite in before and "results" in res:
            print(f"\n{suite} held-out accuracy per task (before -> after):")
            for task, r in res["results"].items():
                b = before[suite]["results"].get(task, {}).get("acc")
                print(f"  {task:<22} {b:.3f} -> {r['acc']:.3f}  (n={r.get('n')})")
    plot = f"\nplot: {summary['plot']}" if "plot" in summary else ""
    print(f"\nmodel: {final_dir}{plot}\nrecord: {record_path}")


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
