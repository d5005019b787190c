"""Held-out accuracy on the synthetic demo task set (per task type and overall), before/after fine-tuning.

    python eval/demo_tasks.py --model smollm2-135m-instruct --output outputs/demo_before.json
    python eval/demo_tasks.py --model outputs/demo --output outputs/demo_after.json
    python eval/demo_tasks.py --compare outputs/demo_before.json outputs/demo_after.json

Each item is multiple choice: lm-eval scores the log-likelihood of every choice right after the prompt that
``owlore.data.build_prompt`` renders for this model's tokenizer (the training prompt). Always offline.
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
    p.add_argument("--split", choices=["test", "train"], default="test", help="test = held-out facts")
    p.add_argument("--n", type=int, help="number of items (default: build_demo_tasks' default, 210 for test)")
    p.add_argument("--seed", type=int, default=0, help="demo task generator seed (use the training one)")
    p.add_argument("--tasks", help="comma-separated task types (default: all)")
    p.add_argument("--limit", type=int, help="score only the first N items of each task type")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint")
    p.add_argument("--output", type=Path, help="write the result JSON here")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="print two saved runs side by side with deltas (B - A), then exit")
    return p


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
    if all(x is None or Path(x).exists() or "/" not in x for x in (args.model, args.adapter)):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # data is generated locally; weights are local too
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from owlore.data import build_demo_tasks
    from owlore.evaluation import evaluate, format_table, load_model, save_results

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    examples = build_demo_tasks(args.split, args.n, seed=args.seed, tasks=tasks)
    model, tokenizer = load_model(args.model, adapter=args.adapter, merge_adapter=args.merge_adapter,
                                  dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    result = evaluate(model, tokenizer, suite="demo", split=args.split, examples=examples, limit=args.limit,
                      batch_size=args.batch_size, model_name=args.model)
    result["seed"] = args.seed
    if args.adapter:
        result["adapter"] = args.adapter
    print(format_table(result))
    if args.output:
        print(f"wrote {save_results(result, args.output)}")
    return result


if __name__ == "__main__":
    main()
