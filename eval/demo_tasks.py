"""Held-out accuracy on the synthetic demo task set (per task type and overall), before/after fine-tuning.

    python eval/demo_tasks.py --model smollm2-135m-instruct --output outputs/demo_before.json
    python eval/demo_tasks.py --model outputs/demo --output outputs/demo_after.json
    python eval/demo_tasks.py --compare outputs/demo_before.json outputs/demo_after.json

Each item is multiple choice: lm-eval scores the log-likelihood of every choice right after the prompt that
``owlore.data.build_prompt`` renders for this model's tokenizer (the training prompt). Always offline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser_with_model_args(__doc__)
    p.add_argument("--split", choices=["test", "train"], default="test", help="test = held-out facts")
    p.add_argument("--n", type=int, help="number of items (default: build_demo_tasks' default, 210 for test)")
    p.add_argument("--seed", type=int, default=0, help="demo task generator seed (use the training one)")
    p.add_argument("--tasks", help="comma-separated task types (default: all)")
    return p


@_cli.entry_point
def main(argv: list[str]) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (comparison := _cli.compare_or_require_model(parser, args)) is not None:
        return comparison
    _cli.go_offline_if_local(args.model, args.adapter, data_local=True)  # the demo data is generated locally

    from owlore.data import build_demo_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    examples = build_demo_tasks(args.split, args.n, seed=args.seed, tasks=tasks)
    result = _cli.load_evaluate_report(args, suite="demo", split=args.split, examples=examples)
    result["seed"] = args.seed
    return result


if __name__ == "__main__":
    raise SystemExit(_cli.exit_code(main()))
