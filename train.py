"""Fine-tune a causal LM with OwLore from a YAML config.

    python train.py --config configs/smollm2_owlore.yaml [section.key=value ...]

Sections: ``model``, ``data``, ``owlore`` (``owlore.OwLoreConfig``), ``training`` (passed to
``transformers.TrainingArguments``), ``eval``. Overrides are YAML scalars: ``owlore.gamma=2``,
``training.max_steps=5``, ``training.resume_from_checkpoint=last``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from owlore.config import ConfigError, DataConfig, EvalConfig, ModelConfig, OwLoreConfig, dataclass_from_dict

logger = logging.getLogger("train")
SECTIONS = ("model", "data", "owlore", "training", "eval")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` as a string; accept it as the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?(?:\d+\.\d*|\.\d+)$|^[-+]?\.(?:inf|Inf|INF)$"
               r"|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    owlore: OwLoreConfig
    training: dict[str, Any]
    eval: EvalConfig = field(default_factory=EvalConfig)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """Set ``a.b=value`` pairs (value parsed as YAML) in place; returns problems."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(f"override {item!r}: expected section.key=value, e.g. owlore.gamma=2")
            continue
        if parts[0] not in SECTIONS:
            problems.append(f"override {item!r}: unknown section {parts[0]!r}; sections: {', '.join(SECTIONS)}")
            continue
        raw.setdefault(parts[0], {})[parts[1]] = parse_yaml(value) if value.strip() else None
    return problems


def training_arguments_problems(training: dict[str, Any]) -> list[str]:
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    out = [f"training.{k}: not a transformers.TrainingArguments field" for k in training if k not in names]
    if "output_dir" not in training:
        out.append("training.output_dir: required (where checkpoints, logs and the model go)")
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML, apply overrides and validate everything; one ``ConfigError`` lists every problem."""
    raw = parse_yaml(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with sections {', '.join(SECTIONS)}")
    problems = [f"{k}: unknown section; sections: {', '.join(SECTIONS)}" for k in raw if k not in SECTIONS]
    problems += apply_overrides(raw, overrides or [])
    parts: dict[str, Any] = {}
    for name, cls in (("model", ModelConfig), ("data", DataConfig), ("owlore", OwLoreConfig), ("eval", EvalConfig)):
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            problems.append(f"{name}: must be a mapping, got {type(section).__name__}")
            continue
        obj, errs = dataclass_from_dict(cls, section, section=name)
        problems += errs
        if obj is not None and hasattr(obj, "problems") and cls is not OwLoreConfig:
            problems += obj.problems()
        parts[name] = obj
    training = raw.get("training") or {}
    problems += training_arguments_problems(training)
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return RunConfig(training=training, **parts)


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """Newest ``checkpoint-N`` holding both the Trainer's and OwLore's state (a crash mid-save leaves neither)."""
    from owlore.callback import STATE_FILE

    ckpts = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in ckpts if (p / "trainer_state.json").is_file() and (p / STATE_FILE).is_file()]
    return str(complete[-1]) if complete else None


def load_model_and_tokenizer(cfg: ModelConfig):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from owlore.assets import resolve_model_name

    name = resolve_model_name(cfg.name)
    dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    kw = {"trust_remote_code": cfg.trust_remote_code}
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
    if when == "after":
        for suite in cfg.eval.suites:
            shots = cfg.eval.shots if cfg.eval.shots is not None else (5 if suite == "mmlu" else 0)
            out[suite] = evaluate(model, tokenizer, suite=suite, data_dir=cfg.eval.data_dir, shots=shots,
                                  split=cfg.eval.mmlu_split if suite == "mmlu" else "test", limit=cfg.eval.limit,
                                  batch_size=cfg.eval.batch_size)
    return out


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/smollm2_owlore.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value (YAML value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from owlore.data.sft import DataError

    try:
        return run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run(cfg: RunConfig) -> dict[str, Any]:
    from transformers import DataCollatorForSeq2Seq, TrainingArguments
    from transformers.trainer_utils import set_seed

    from owlore import OwLoreTrainer
    from owlore.data.sft import load_rows, tokenize_rows
    from owlore.metrics import OwLoreLogger, owlore_tensorboard_dir, peak_memory_bytes
    from owlore.plotting import layer_table, plot_layer_statistics

    training = dict(cfg.training)
    resume = training.pop("resume_from_checkpoint", None)
    out_dir = Path(training["output_dir"])
    if resume == "last":
        resume = last_complete_checkpoint(out_dir)
        logger.info("resuming from %s", resume or "scratch (no complete checkpoint)")
    if cfg.model.gradient_checkpointing:
        training.setdefault("gradient_checkpointing", True)
        training.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    try:  # value checks that depend on the machine (e.g. bf16 on a CPU) happen here, not in load_config
        training_args = TrainingArguments(**training)
    except (ValueError, TypeError, ImportError) as e:
        raise ConfigError(f"training: {str(e).strip().splitlines()[0]}") from e
    set_seed(training_args.seed)
    t_start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    rows = load_rows(cfg.data.train, split=cfg.data.split, limit=cfg.data.limit)
    train_ds = tokenize_rows(rows, tokenizer, max_seq_length=cfg.data.max_seq_length, packing=cfg.data.packing,
                             skip_bad_rows=cfg.data.skip_bad_rows)
    logger.info("training on %d examples from %s", len(train_ds), cfg.data.train)
    before = run_eval(model, tokenizer, cfg, "before") if not resume else {}

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)
    trainer = OwLoreTrainer(model=model, args=training_args, train_dataset=train_ds, data_collator=collator,
                            processing_class=tokenizer, owlore_config=cfg.owlore)
    t_train = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - t_train
    after = run_eval(model, tokenizer, cfg, "after")

    final_dir = out_dir / "final"
    trainer.save_model(str(final_dir))
    tokenizer.save_pretrained(final_dir)
    cb = trainer.owlore_callback
    record = cb.record()
    png = plot_layer_statistics(out_dir / "layers.png", record["outlier_ratios"], record["inclusion_probabilities"],
                                record["activation_counts"], title=f"OwLore on {cfg.model.name}")
    steps = trainer.state.global_step - (trainer._initial_global_step or 0)
    summary = {
        "train_loss": result.training_loss,
        "optimizer_steps": trainer.state.global_step,
        "train_seconds": train_seconds,
        "steps_per_second": steps / train_seconds if train_seconds > 0 else None,
        "peak_memory_bytes": peak_memory_bytes(),
        "wall_seconds": time.perf_counter() - t_start,
        "layers_sampled": sorted({i for _, ls in cb.history for i in ls}),
        "eval_before": before,
        "eval_after": after,
        "model_dir": str(final_dir),
        "plot": str(png),
    }
    cb.write_record(summary=summary)
    from owlore.evaluation import save_results

    tb = OwLoreLogger(owlore_tensorboard_dir(out_dir)) if "tensorboard" in (training_args.report_to or []) else None
    for when, res in (("before", before), ("after", after)):
        for suite, r in res.items():
            save_results(r, out_dir / f"eval_{suite}_{when}.json")
            if tb and r.get("average") is not None:
                tb.scalars(trainer.state.global_step, {f"eval/{suite}_{when}": r["average"]})
    if tb:
        tb.close()
    rows_out = [("train loss", f"{result.training_loss:.4f}"), ("optimizer steps", str(trainer.state.global_step)),
                ("steps/s", f"{summary['steps_per_second']:.3f}"), ("train time", f"{train_seconds:.0f} s"),
                ("wall time (load+eval+train)", f"{summary['wall_seconds']:.0f} s"),
                ("peak memory (RSS/CUDA)", f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB"),
                ("distinct layers trained", f"{len(summary['layers_sampled'])} of {len(cb.layers)}")]
    for suite in after:
        b = before.get(suite, {}).get("average")
        a = after[suite].get("average")
        rows_out.append((f"{suite} accuracy (before -> after)",
                         f"{b:.3f} -> {a:.3f}" if b is not None else f"{a:.3f}"))
    logger.info("per-layer statistics:\n%s", layer_table(record["outlier_ratios"], record["inclusion_probabilities"],
                                                         record["activation_counts"]))
    print("\n" + summary_table(rows_out))
    for suite, res in after.items():
        if suite in before and "results" in res:
            print(f"\n{suite} held-out accuracy per task (before -> after):")
            for task, r in res["results"].items():
                b = before[suite]["results"].get(task, {}).get("acc")
                print(f"  {task:<22} {b:.3f} -> {r['acc']:.3f}  (n={r.get('n')})")
    print(f"\nmodel: {final_dir}\nplot: {png}\nrecord: {out_dir / 'owlore_record.json'}")
    return summary


if __name__ == "__main__":
    main()
