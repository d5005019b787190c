"""MMLU accuracy of a model (or base + LoRA adapter) with lm-eval's own MMLU prompt and scoring.

    python eval/mmlu.py --model smollm2-135m-instruct --split dev --shots 0        # offline: dev items in lm-eval
    python eval/mmlu.py --model HuggingFaceTB/SmolLM2-135M-Instruct --shots 5      # online: hub cais/mmlu test
    python eval/mmlu.py --model outputs/run --data-dir data/ --output mmlu.json  # offline: data/mmlu/{test,dev}.jsonl
    python eval/mmlu.py --compare before.json after.json

See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF id, save_pretrained dir, adapter dir, or 'smollm2-135m-instruct'")
    p.add_argument("--adapter", help="peft (LoRA) adapter dir applied on top of --model")
    p.add_argument("--merge-adapter", action="store_true", help="merge the adapter into the weights first")
    p.add_argument("--split", choices=["test", "dev"], default="test",
                   help="dev = the MMLU dev items shipped inside lm-eval (no network needed)")
    p.add_argument("--shots", type=int, default=5, help="few-shot examples (on dev: at most subject size - 1)")
    p.add_argument("--data-dir", type=Path, help="local data root holding mmlu/test.jsonl and mmlu/dev.jsonl")
    p.add_argument("--tasks", help="comma-separated subjects, e.g. anatomy,astronomy (default: all 57)")
    p.add_argument("--limit", type=int, help="score only the first N items of each subject")
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
    go_offline_if_local(args.model, args.adapter, args.data_dir is not None or args.split == "dev")

    from owlore.evaluation import check_data, evaluate, format_table, load_model, save_results

    subjects = args.tasks.split(",") if args.tasks else None
    try:  # missing local data: say which file before loading any weights, and without a traceback
        check_data(suite="mmlu", data_dir=args.data_dir, split=args.split, shots=args.shots, tasks=subjects)
    except FileNotFoundError as e:
        parser.exit(2, f"error: {e}\n")
    model, tokenizer = load_model(args.model, adapter=args.adapter, merge_adapter=args.merge_adapter,
                                  dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    result = evaluate(model, tokenizer, suite="mmlu", data_dir=args.data_dir, split=args.split, shots=args.shots,
                      limit=args.limit, batch_size=args.batch_size, max_length=args.max_length, tasks=subjects,
                      model_name=args.model)
    if args.adapter:
        result["adapter"] = args.adapter
    print(format_table(result))
    if args.output:
        print(f"wrote {save_results(result, args.output)}")
    return result


if __name__ == "__main__":
    main()
