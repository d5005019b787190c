"""MMLU accuracy of a model (or base + LoRA adapter) with lm-eval's own MMLU prompt and scoring.

    python eval/mmlu.py --model smollm2-135m-instruct --split dev --shots 0        # offline: dev items in lm-eval
    python eval/mmlu.py --model HuggingFaceTB/SmolLM2-135M-Instruct --shots 5      # online: hub cais/mmlu test
    python eval/mmlu.py --model outputs/run --data-dir data/ --output mmlu.json  # offline: data/mmlu/{test,dev}.jsonl
    python eval/mmlu.py --compare before.json after.json

See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser_with_model_args(__doc__)
    p.add_argument("--split", choices=["test", "dev"], default="test",
                   help="dev = the MMLU dev items shipped inside lm-eval (no network needed)")
    p.add_argument("--shots", type=int, default=5, help="few-shot examples (on dev: at most subject size - 1)")
    p.add_argument("--data-dir", type=Path, help="local data root holding mmlu/test.jsonl and mmlu/dev.jsonl")
    p.add_argument("--tasks", help="comma-separated subjects, e.g. anatomy,astronomy (default: all 57)")
    p.add_argument("--max-length", type=int, help="context length (default: the model's)")
    return p


@_cli.entry_point
def main(argv: list[str]) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (comparison := _cli.compare_or_require_model(parser, args)) is not None:
        return comparison
    _cli.go_offline_if_local(args.model, args.adapter, args.data_dir is not None or args.split == "dev")
    subjects = args.tasks.split(",") if args.tasks else None
    _cli.check_data_or_exit(parser, suite="mmlu", data_dir=args.data_dir, split=args.split, shots=args.shots,
                            tasks=subjects)
    return _cli.load_evaluate_report(args, suite="mmlu", data_dir=args.data_dir, split=args.split, shots=args.shots,
                                     max_length=args.max_length, tasks=subjects)


if __name__ == "__main__":
    raise SystemExit(_cli.exit_code(main()))
