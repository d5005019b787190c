"""Commonsense-reasoning accuracy (the OwLore paper's eight tasks) with lm-eval's own prompts and scoring.

    python eval/commonsense.py --model HuggingFaceTB/SmolLM2-135M-Instruct            # online: hub datasets
    python eval/commonsense.py --model outputs/run --data-dir data/ --tasks piqa,boolq  # offline: data/<task>/<split>.jsonl
    python eval/commonsense.py --model base --adapter outputs/lora --output after.json
    python eval/commonsense.py --compare before.json after.json

Tasks: boolq, piqa, siqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402

TASKS = "boolq,piqa,siqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser_with_model_args(__doc__)
    p.add_argument("--tasks", default=TASKS, help=f"comma-separated subset of {TASKS}")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples (offline: from <task>/train.jsonl)")
    p.add_argument("--data-dir", type=Path,
                   help="local data root: <dir>/<task>/<split>.jsonl in each dataset's HF schema")
    p.add_argument("--max-length", type=int, help="context length (default: the model's)")
    return p


@_cli.entry_point
def main(argv: list[str]) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (comparison := _cli.compare_or_require_model(parser, args)) is not None:
        return comparison
    _cli.go_offline_if_local(args.model, args.adapter, args.data_dir is not None)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    _cli.check_data_or_exit(parser, suite="commonsense", data_dir=args.data_dir, shots=args.shots, tasks=tasks)
    return _cli.load_evaluate_report(args, suite="commonsense", data_dir=args.data_dir, shots=args.shots,
                                     max_length=args.max_length, tasks=tasks)


if __name__ == "__main__":
    raise SystemExit(_cli.exit_code(main()))
