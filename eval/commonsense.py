"""Commonsense-reasoning accuracy (the OwLore paper's eight tasks) with lm-eval's own prompts and scoring.

    python eval/commonsense.py --model HuggingFaceTB/SmolLM2-135M-Instruct            # online: hub datasets
    python eval/commonsense.py --model outputs/run --data-dir data/ --tasks piqa,boolq  # offline: data/<task>/<split>.jsonl
    python eval/commonsense.py --model base --adapter outputs/lora --output after.json
    python eval/commonsense.py --compare before.json after.json

Tasks: boolq, piqa, siqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TASKS = "boolq,piqa,siqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF id, save_pretrained dir, adapter dir, or 'smollm2-135m-instruct'")
    p.add_argument("--adapter", help="peft (LoRA) adapter dir applied on top of --model")
    p.add_argument("--merge-adapter", action="store_true", help="merge the adapter into the weights first")
    p.add_argument("--tasks", default=TASKS, help=f"comma-separated subset of {TASKS}")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples (offline: from <task>/train.jsonl)")
    p.add_argument("--data-dir", type=Path,
                   help="local data root: <dir>/<task>/<split>.jsonl in each dataset's HF schema")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="context length (default: the model's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint")
    p.add_argument("--output", type=Path, help="write the result JSON here")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="print two saved runs side by side with deltas (B - A), then exit")
    return p


def go_offline_if_local(model: str, adapter: str | None, data_local: bool) -> None:
    """Set HF offline mode (unless the user set it) when neither data nor weights need the hub.

    Done before transformers / datasets are imported, since they read it at import time.
    """
    weights_local = all(x is None or Path(x).exists() or "/" not in x for x in (model, adapter))
    if data_local and weights_local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        from owlore.evaluation import compare_results, format_comparison, load_results

        a, b = (load_results(p) for p in args.compare)
        print(format_comparison(a, b))
        return compare_results(a, b)
    if not args.model:
        parser.error("--model is required (or use --compare A.json B.json)")
    go_offline_if_local(args.model, args.adapter, args.data_dir is not None)

    from owlore.evaluation import check_data, evaluate, format_table, load_model, save_results

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:  # missing local data: say which file before loading any weights, and without a traceback
        check_data(suite="commonsense", data_dir=args.data_dir, shots=args.shots, tasks=tasks)
    except FileNotFoundError as e:
        parser.exit(2, f"error: {e}\n")
    model, tokenizer = load_model(args.model, adapter=args.adapter, merge_adapter=args.merge_adapter,
                                  dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    result = evaluate(model, tokenizer, suite="commonsense", data_dir=args.data_dir, shots=args.shots,
                      limit=args.limit, batch_size=args.batch_size, max_length=args.max_length, tasks=tasks,
                      model_name=args.model)
    if args.adapter:
        result["adapter"] = args.adapter
    print(format_table(result))
    if args.output:
        print(f"wrote {save_results(result, args.output)}")
    return result


if __name__ == "__main__":
    main()
