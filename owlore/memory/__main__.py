"""Estimate a run's peak training memory from its config, without loading any weights.

    python -m owlore.memory --config configs/memory/llama2_7b_owlore.yaml [section.key=value ...] [--compare-methods]
        [--json]
    python -m owlore.memory --fit 24GiB --model <hub id or dir> [--seq 2048] [--batch 8] [--dtype bfloat16]
        [--quality benchmarks/results/manpages_methods/bench.json]      # what fits, cheapest first (owlore.memory.fit)

Prints the breakdown at the peak (weights, gradients, optimizer state, activations, logits, temporaries) and the
moment it happens. ``--compare-methods`` gives one row per method for the same model, batch and sequence length
(each with its ``configs/paper/<method>.yaml`` overlay when there is one), then OwLore with each memory option,
next to the published figures. The model's ``config.json`` is read from the hub or a local directory; offline,
the shipped architectures of Llama-2-7B, Llama-3-8B and Mistral-7B stand in (owlore/memory/model_configs/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from owlore.cli import entry_point, exit_code
from owlore.memory.estimator import CATEGORIES, GIB, MemoryEstimate, estimate_run
from owlore.memory.method_runs import compare
from owlore.run.config import ConfigError


def comparison_table(rows: list[tuple[str, MemoryEstimate | None, str]]) -> str:
    head = ["method / option", "peak GiB", "peak GB", "moment", *CATEGORIES, "host GiB", "published"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 2 + "---|" + "---:|" * (len(CATEGORIES) + 1)
             + "---|"]
    for name, e, published in rows:
        if e is None:
            lines.append(f"| {name} | | | | " + " | " * len(CATEGORIES) + f" | {published} |")
            continue
        cats = " | ".join(f"{getattr(e, c) / GIB:.2f}" for c in CATEGORIES)
        lines.append(f"| {name} | {e.total / GIB:.2f} | {e.total / 1e9:.1f} | {e.peak_moment} | {cats} | "
                     f"{e.host / GIB:.2f} | {published} |")
    return "\n".join(lines)


@entry_point
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m owlore.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="YAML file; repeat to compose")
    p.add_argument("--fit", metavar="SIZE", help="list the methods and options that fit SIZE (24GiB, 80GB), cheapest first")
    p.add_argument("--model", help="with --fit: hub id, local directory or config.json of the model")
    p.add_argument("--seq", type=int, default=2048, help="with --fit: tokens per row (default 2048)")
    p.add_argument("--batch", type=int, default=8, help="with --fit: rows per device step (default 8)")
    p.add_argument("--dtype", default="bfloat16", help="with --fit: training dtype (default bfloat16)")
    p.add_argument("--quality", default=str(Path(__file__).resolve().parents[2] / "benchmarks" / "results" /
                                            "manpages_methods" / "bench.json"),
                   help="with --fit: a quality benchmark's bench.json whose ranks are shown")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for train.py")
    p.add_argument("--compare-methods", action="store_true", help="one row per method, then OwLore's options")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = p.parse_args(argv)
    if args.fit is not None:
        return _fit(p, args)
    if not args.config:
        p.error("--config FILE is required (or --fit SIZE --model NAME)")
    try:
        if args.compare_methods:
            rows = compare(args.config, args.overrides)
            if args.json:
                print(json.dumps([{"name": n, "published": f, **(e.to_dict() if e else {})} for n, e, f in rows],
                                 indent=1))
            else:
                first = next(e for _, e, _ in rows if e is not None)
                print(f"{first.settings['model']}, {first.settings['dtype']}, batch {first.settings['batch']} x "
                      f"seq {first.settings['seq']}\n")
                print(comparison_table(rows))
                print("\nPublished figures are each paper's own setting; GB = 1e9 bytes, GiB = 2**30.")
            return 0
        from owlore.run.recipe import load_config

        est = estimate_run(load_config(args.config, args.overrides))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict(), indent=1) if args.json else est.table())
    return 0


def _fit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from owlore.memory.fit import fit

    if not args.model:
        parser.error("--fit needs --model <hub id, local directory or config.json>")
    if args.seq < 1 or args.batch < 1:
        parser.error(f"--seq {args.seq} / --batch {args.batch}: must be >= 1")
    result = fit(args.fit, args.model, seq=args.seq, batch=args.batch, dtype=args.dtype, quality=args.quality,
                 overrides=args.overrides)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1))
        return 0
    print(f"{args.model}, {args.dtype}, batch {args.batch} x seq {args.seq}\n")
    print(result["table"])
    for line in result["skipped"]:
        print(f"not estimated: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
