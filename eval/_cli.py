"""Shared command-line plumbing of eval/mmlu.py, eval/commonsense.py and eval/demo_tasks.py."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from owlore.cli import entry_point, exit_code  # noqa: F401  (the scripts' main wrapper)
from owlore.errors import UsageError


def parser_with_model_args(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every evaluation script shares (model, adapter, dtype, output, compare...)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF id, save_pretrained dir, adapter dir, or 'smollm2-135m-instruct'")
    p.add_argument("--adapter", help="peft (LoRA) adapter dir applied on top of --model")
    p.add_argument("--merge-adapter", action="store_true", help="merge the adapter into the weights first")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="load the base in 4-bit NF4 (bitsandbytes), as a QLoRA run trained it")
    every_item = positive_int("leave the flag out to use every item")
    p.add_argument("--limit", type=every_item, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=every_item, default=8)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint")
    p.add_argument("--output", type=Path, help="write the result JSON here")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="print two saved runs side by side with deltas (B - A), then exit")
    return p


def positive_int(why: str) -> Callable[[str], int]:
    """An argparse type: an integer >= 1, refused with ``why`` in the message (``--limit 0`` would score
    nothing, ``-1`` fails inside lm-eval; a budget of 0 keeps no token)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} is not >= 1 ({why})")
        return value

    return parse


def go_offline_if_local(model: str, adapter: str | None, data_local: bool) -> None:
    """Set HF offline mode (unless the user set it) when neither data nor weights need the hub.

    Done before transformers / datasets are imported, since they read it at import time.
    """
    weights_local = all(x is None or Path(x).exists() or "/" not in x for x in (model, adapter))
    if data_local and weights_local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def compare_or_require_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict | None:
    """Handle ``--compare A.json B.json`` (returns the comparison); otherwise insist on ``--model``."""
    if args.compare:
        from owlore.evaluation import compare_results, format_comparison, load_results

        for path in args.compare:
            if not path.is_file():
                raise UsageError(f"--compare {path}: no such file (give two --output JSON files of earlier runs)")
        a, b = (load_results(p) for p in args.compare)
        print(format_comparison(a, b))
        return compare_results(a, b)
    if not args.model:
        parser.error("--model is required (or use --compare A.json B.json)")
    return None


def check_data_or_exit(parser: argparse.ArgumentParser, **kwargs: Any) -> None:
    """Missing local data: name the file before loading any weights, and exit 2 without a traceback."""
    from owlore.evaluation import check_data

    try:
        check_data(**kwargs)
    except FileNotFoundError as e:
        parser.exit(2, f"error: {e}\n")


def load_evaluate_report(args: argparse.Namespace, **evaluate_kwargs: Any) -> dict:
    """Load the model (+ adapter), run ``owlore.evaluation.evaluate``, print the table, save the JSON."""
    from owlore.evaluation import evaluate, format_table, load_model, save_results

    model, tokenizer = load_model(args.model, adapter=args.adapter, merge_adapter=args.merge_adapter,
                                  dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                                  load_in_4bit=args.load_in_4bit)
    result = evaluate(model, tokenizer, limit=args.limit, batch_size=args.batch_size, model_name=args.model,
                      **evaluate_kwargs)
    if args.adapter:
        result["adapter"] = args.adapter
    print(format_table(result))
    if args.output:
        print(f"wrote {save_results(result, args.output)}")
    return result
