"""Visual-token pruning benchmarks: speed on LLaVA-shaped models built from config, accuracy on a trained LLaVA.

    python eval/vlm_pruning.py speed                 # LLaVA-1.5 layout, 576 -> 192/128/64, ~8 min on 2 cores
    python eval/vlm_pruning.py speed --quick --out /tmp/x   # seconds; used by the tests
    python eval/vlm_pruning.py accuracy --model <hub id or dir> --data <dir with images + questions.jsonl>
    python eval/vlm_pruning.py accuracy --model outputs/fashion_llava_full/final --data .cache/tasks/fashion_vqa

``accuracy`` scores every method at 1/2, 1/4, 1/9 and 1/36 of the visual tokens (or ``--budgets``) on any VQA
directory (``owlore.data.vqa_files``: rows with ``choices`` by log-likelihood, others by exact match of the greedy
answer), on any VLM the pruner supports, and writes accuracy.json / .md (overall and per question kind) /
accuracy.png, accuracy_by_kind.png and kept_tokens.png (``owlore.pruning.vqa_benchmark``). The Fashion-MNIST
benchmark is one such directory, written by ``make fashion-mnist``.

Random weights make the latency and FLOPs meaningful but say nothing about accuracy. The language model
is the 7B width (hidden 4096, ffn 11008, 32 heads) at reduced depth so it fits on a CPU; FLOPs are also
reported analytically at full depth (32 layers). Selection overhead is compared with the measured
prefill at the run depth and with that prefill extrapolated linearly to full depth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402

from owlore.cli import entry_point, exit_code  # noqa: E402
from owlore.errors import UsageError  # noqa: E402
from owlore.pruning.registry import method_names  # noqa: E402

ALL_METHODS = list(method_names())


BUDGET = _cli.positive_int("a budget is the visual tokens kept per image")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed", help="FLOPs, latency and KV-cache size per method and budget")
    p.add_argument("--out", type=Path, default=Path("outputs/vlm_pruning"), help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (for tests)")
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    p.add_argument(
        "--budgets", nargs="+", type=BUDGET, default=[192, 128, 64], help="visual tokens kept per image"
    )
    p.add_argument("--repeats", type=int, default=2, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement")
    p.add_argument("--new-tokens", type=int, default=4, help="max_new_tokens of the end-to-end generate")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=60, help="text tokens around the image (35 before it)")
    p.add_argument("--zoo-directions", type=int, default=16, help="ZOO-Prune m (paper: 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (timings then wait for the GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g = p.add_argument_group("vision tower (default: CLIP-L/336 layout, depth-reduced)")
    g.add_argument("--image-size", type=int, default=336)
    g.add_argument("--patch-size", type=int, default=14)
    g.add_argument("--vision-hidden", type=int, default=1024)
    g.add_argument("--vision-ffn", type=int, default=4096)
    g.add_argument("--vision-heads", type=int, default=16)
    g.add_argument("--vision-layers", type=int, default=4, help="CLIP-L has 24")
    g = p.add_argument_group("language model (default: LLaVA-1.5-7B width, depth-reduced)")
    g.add_argument("--lm-hidden", type=int, default=4096)
    g.add_argument("--lm-ffn", type=int, default=11008)
    g.add_argument("--lm-heads", type=int, default=32)
    g.add_argument("--lm-kv-heads", type=int, default=32)
    g.add_argument("--lm-layers", type=int, default=2, help="run depth (7B has 32)")
    g.add_argument("--full-layers", type=int, default=32, help="depth for the analytic full-model figures")
    g.add_argument("--vocab", type=int, default=32000)
    a = sub.add_parser("accuracy", help="VQA accuracy per method and budget, on any supported VLM and VQA directory")
    a.add_argument("--model", required=True,
                   help="HF hub id or save_pretrained dir of a LLaVA / LLaVA-NeXT / Qwen2-VL (train.py's final/)")
    a.add_argument("--data", type=Path, required=True,
                   help="a directory of images + questions.jsonl ({image, question, answer[, choices, kind]})")
    a.add_argument("--out", type=Path, default=Path("outputs/vlm_pruning_accuracy"))
    a.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    a.add_argument("--budgets", nargs="+", type=BUDGET, default=None,
                   help="visual tokens kept per image (default: 1/2, 1/4, 1/9 and 1/36 of them)")
    a.add_argument("--limit", type=_cli.positive_int("leave it out to score every question"), default=None,
                   help="score the first N questions")
    a.add_argument("--prompt", default=None,
                   help="prompt template with {question} and the image token (default: the processor's chat template)")
    a.add_argument("--max-new-tokens", type=int, default=16, help="answer length of rows without choices")
    a.add_argument("--scoring", default="auto", choices=["auto", "first-token", "full"],
                   help="choice rows: auto = exact log-likelihood (one pass when every choice is one token); "
                        "first-token = the first token decides when they differ (faster, approximate)")
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--repeats", type=int, default=3, help="timed prefill repeats (median)")
    a.add_argument("--zoo-directions", type=int, default=16)
    a.add_argument("--llm-layer", type=int, default=None,
                   help="K of the methods that prune inside the language model (fastv, dart; default: theirs, 2)")
    a.add_argument("--method-option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="an option of one method, e.g. vscan.stage2_keep=8 vscan.layer=15 (repeatable)")
    a.add_argument("--draw", type=int, default=4, help="example images in kept_tokens.png (LLaVA-1.5 grids)")
    a.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    a.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    a.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint")
    a.add_argument("--threads", type=int, default=2)
    return parser


def run_accuracy(args: argparse.Namespace) -> dict:
    """Read the questions, load the model, score every (method, budget), write the files."""
    from owlore.data.vqa_files import read_vqa_dir
    from owlore.evaluation.loading import resolve_device, resolve_dtype
    from owlore.pruning import vqa_benchmark as vb
    from owlore.pruning.models import adapter_for
    from owlore.pruning.vlm_inputs import image_tokens, load_vlm

    torch.set_num_threads(args.threads)
    method_options = parse_method_options(args.method_option)
    records = read_vqa_dir(args.data, limit=args.limit)  # bad rows fail before the weights load
    device = resolve_device(args.device)
    model, processor = load_vlm(args.model, dtype=resolve_dtype(args.dtype, device), device=device,
                                trust_remote_code=args.trust_remote_code)
    n_tokens = image_tokens(processor, records[0], args.prompt)
    square = adapter_for(model).name == "llava"  # one unit of n_tokens per image: budgets and drawings in tokens
    if args.budgets and square and max(args.budgets) > n_tokens:
        raise UsageError(f"--budgets {' '.join(map(str, args.budgets))}: the model has {n_tokens} visual tokens per "
                         f"image; give budgets from 1 to {n_tokens}")
    budgets = args.budgets or ([n_tokens // 2, n_tokens // 4, n_tokens // 9, max(1, n_tokens // 36)] if square
                               else [1 / 2, 1 / 4, 1 / 9, 1 / 36])
    rows = vb.accuracy_table(model, processor, records, methods=args.methods, budgets=budgets,
                             method_options=method_options,
                             num_image_tokens=n_tokens, batch_size=args.batch, repeats=args.repeats,
                             zoo_directions=args.zoo_directions, llm_layer=args.llm_layer, prompt=args.prompt,
                             max_new_tokens=args.max_new_tokens, scoring=args.scoring)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python " + shlex.join(sys.argv), "model": str(args.model), "data": str(args.data),
              "visual_tokens": n_tokens, "examples": len(records), "scoring": args.scoring, "torch": torch.__version__,
              "device": device, "dtype": str(next(model.parameters()).dtype), "threads": torch.get_num_threads(),
              "rows": rows}
    (args.out / "accuracy.json").write_text(json.dumps(result, indent=2))
    (args.out / "accuracy.md").write_text(f"Command: `{result['command']}`\n\n" + vb.to_markdown(rows)
                                          + "\n" + vb.kind_tables(rows))
    title = f"{args.data.name}: {len(records)} questions"
    vb.plot_accuracy(rows, args.out / "accuracy.png", title=title)
    vb.plot_by_kind(rows, args.out / "accuracy_by_kind.png", title=title)
    drawn = ""
    if args.draw and square:
        vb.draw_kept(model, processor, records[:args.draw], args.methods, budgets[min(2, len(budgets) - 1)],
                     n_tokens, args.out / "kept_tokens.png", zoo_directions=args.zoo_directions,
                     llm_layer=args.llm_layer, prompt=args.prompt)
        drawn = ", kept_tokens.png"
    print(vb.to_markdown(rows))
    print(vb.kind_tables(rows))
    print(f"wrote {args.out}/accuracy.json, accuracy.md, accuracy.png, accuracy_by_kind.png{drawn}")
    return result


def parse_method_options(items: list[str]) -> dict[str, dict]:
    """``["vscan.stage2_keep=8", ...]`` -> ``{"vscan": {"stage2_keep": 8}}`` (values read as YAML scalars), each
    checked against the method's declared options."""
    import yaml

    from owlore.pruning.registry import get_method

    out: dict[str, dict] = {}
    for item in items:
        name, _, value = item.partition("=")
        method, _, key = name.partition(".")
        if not (method and key and value):
            raise UsageError(f"--method-option {item!r}: write METHOD.KEY=VALUE, e.g. vscan.stage2_keep=8")
        known = get_method(method).options
        if key not in known:
            raise UsageError(f"--method-option {item!r}: {method} reads {', '.join(known) or 'no options'}")
        out.setdefault(method, {})[key] = yaml.safe_load(value)
    return out


def apply_quick(args: argparse.Namespace) -> None:
    """Shrink everything so the whole pipeline runs in seconds."""
    args.image_size, args.patch_size = 32, 8
    args.vision_hidden, args.vision_ffn, args.vision_heads, args.vision_layers = 32, 64, 4, 2
    args.lm_hidden, args.lm_ffn, args.lm_heads, args.lm_kv_heads, args.lm_layers = 64, 128, 4, 2, 2
    args.vocab, args.text_tokens = 256, 12
    args.budgets = [b for b in args.budgets if b < 16] or [8, 4]
    args.repeats, args.warmup, args.new_tokens = 1, 1, 2


def build_model(args: argparse.Namespace):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=args.vision_ffn,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_heads,
        image_size=args.image_size,
        patch_size=args.patch_size,
    )
    text = LlamaConfig(
        hidden_size=args.lm_hidden,
        intermediate_size=args.lm_ffn,
        num_hidden_layers=args.lm_layers,
        num_attention_heads=args.lm_heads,
        num_key_value_heads=args.lm_kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=args.vocab - 1)
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model.to(device=getattr(args, "device", "cpu"), dtype=getattr(torch, getattr(args, "dtype", "float32")))


def make_inputs(args: argparse.Namespace, num_visual: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    before = min(35, args.text_tokens)
    text = torch.randint(3, args.vocab - 1, (args.batch, args.text_tokens), generator=gen)
    image = torch.full((args.batch, num_visual), args.vocab - 1)
    ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    device, dtype = getattr(args, "device", "cpu"), getattr(torch, getattr(args, "dtype", "float32"))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device=device, dtype=dtype)}


def timed(fn, *, repeats: int, warmup: int) -> tuple[float, object]:
    """Median wall time (ms) of ``fn()`` after ``warmup`` untimed calls, and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def measure(model, pruner, raw: dict, args: argparse.Namespace, *, warmup: int) -> dict[str, float]:
    """Vision / selection time from ``prepare`` and end-to-end ``prepare + generate`` time (ms)."""
    stats: list[dict] = []

    def end_to_end():
        inputs = pruner.prepare(model, **raw)
        stats.append(dict(pruner.last_stats))
        return model.generate(
            **inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
        )

    with torch.no_grad():
        e2e, _ = timed(end_to_end, repeats=args.repeats, warmup=warmup)
    timed_stats = stats[warmup:]
    return {
        "vision_ms": statistics.median(s["vision_s"] for s in timed_stats) * 1e3,
        "select_ms": statistics.median(s["select_s"] for s in timed_stats) * 1e3,
        "project_ms": statistics.median(s["project_s"] for s in timed_stats) * 1e3,
        "e2e_ms": e2e,
    }


def measure_prefill(model, inputs: dict, args: argparse.Namespace) -> float:
    """LLM prefill (placeholder merge + decoder layers + last-token logits), median ms."""
    with torch.no_grad():
        ms, _ = timed(
            lambda: model(**inputs, logits_to_keep=1, use_cache=True),
            repeats=args.repeats,
            warmup=args.warmup,
        )
    return ms


def analytic(args: argparse.Namespace, method: str, k: int, num_visual: int) -> dict[str, float]:
    from owlore.pruning.flops import (
        LMShape,
        VisionShape,
        kv_cache_bytes,
        prefill_flops_exact,
        prefill_flops_peer,
        pruned_prompt_cost,
        selection_flops,
    )

    full = LMShape(args.lm_hidden, args.lm_ffn, args.full_layers, args.lm_heads, args.lm_kv_heads)
    vision = VisionShape(
        args.vision_hidden,
        args.vision_ffn,
        args.vision_layers,
        args.vision_heads,
        num_visual + 1,
        args.lm_hidden,
    )
    n = args.text_tokens + k

    def cost(fn) -> float:  # one layer split for every figure: LLM-stage methods see the whole prompt in layers < K
        if method == "none":
            return fn(n, full)
        return pruned_prompt_cost(fn, method, text_tokens=args.text_tokens, visual_tokens=num_visual, kept=k, lm=full)

    exact, peer = cost(prefill_flops_exact), cost(prefill_flops_peer)
    kv = cost(lambda tokens, shape: kv_cache_bytes(tokens, shape, bytes_per_element=2, batch=args.batch))
    return {
        "seq_len": n,
        "prefill_tflops_peer_full": peer / 1e12,
        "prefill_tflops_exact_full": exact / 1e12,
        "select_gflops": 0.0
        if method == "none"
        else selection_flops(method, k, vision, directions=args.zoo_directions) / 1e9,
        "kv_cache_mb_full_fp16": kv / 2**20,
    }


def summarise(row: dict, base: dict, prefill_ms: float, scale: float, flops: dict) -> dict:
    """Add analytic figures and the overhead / reduction ratios to a measured row."""
    row.update(flops, prefill_ms=prefill_ms)
    row["select_pct_of_prefill"] = 100 * row["select_ms"] / prefill_ms
    row["select_pct_of_prefill_full_depth"] = 100 * row["select_ms"] / (prefill_ms * scale)
    row["select_pct_flops_full"] = 100 * row["select_gflops"] / (row["prefill_tflops_exact_full"] * 1e3)
    row["flops_reduction_exact"] = base["prefill_tflops_exact_full"] / row["prefill_tflops_exact_full"]
    row["flops_reduction_peer"] = base["prefill_tflops_peer_full"] / row["prefill_tflops_peer_full"]
    return row


def run_speed(args: argparse.Namespace) -> dict:
    from owlore.pruning import VisualTokenPruner, get_method
    from owlore.pruning.vqa_benchmark import make_pruner

    torch.set_num_threads(args.threads)
    num_visual = (args.image_size // args.patch_size) ** 2
    model = build_model(args)
    raw = make_inputs(args, num_visual)
    scale = args.full_layers / args.lm_layers
    rows = []

    base_pruner = VisualTokenPruner("random", num_visual)  # keep == N: the unpruned pipeline
    with torch.no_grad():
        base_inputs = base_pruner.prepare(model, **raw)
    base = {
        "method": "none",
        "tokens": num_visual,
        **measure(model, base_pruner, raw, args, warmup=args.warmup),
    }
    base["prefill_ms"] = measure_prefill(model, base_inputs, args)
    base.update(analytic(args, "none", num_visual, num_visual))
    rows.append(base)
    print(
        f"baseline {num_visual} tokens: prefill {base['prefill_ms']:.0f} ms, e2e {base['e2e_ms']:.0f} ms",
        flush=True,
    )

    prefill_by_k: dict[int, float] = {}
    for method in args.methods:
        # One pruner per method, warmed up once: caches such as the ZOO-exact kernel survive budget changes.
        # LLM-stage methods on the reduced-depth run model: K = theirs, at most lm_layers - 1 (the analytic
        # full-depth figures keep their K)
        pruner = make_pruner(method, args.budgets[0], zoo_directions=args.zoo_directions, seed=args.seed,
                             llm_layer=min(get_method(method).default_layer, args.lm_layers - 1))
        stage = pruner.spec.stage
        for i, k in enumerate(args.budgets):
            pruner.keep = k
            row = {
                "method": method,
                "tokens": k,
                **measure(model, pruner, raw, args, warmup=args.warmup if i == 0 else 0),
            }
            key = (k, stage if stage == "vision" else method)
            if key not in prefill_by_k:  # pre-LLM prefill cost depends only on the prompt length
                with torch.no_grad():
                    prefill_by_k[key] = measure_prefill(model, pruner.prepare(model, **raw), args)
            rows.append(summarise(row, base, prefill_by_k[key], scale, analytic(args, method, k, num_visual)))
            print(
                f"{method:>10} {k:>4}: select {row['select_ms']:.1f} ms, prefill {prefill_by_k[key]:.0f} ms, "
                f"e2e {row['e2e_ms']:.0f} ms",
                flush=True,
            )
        pruner.detach(model)
    rows[1:] = sorted(rows[1:], key=lambda r: (-r["tokens"], args.methods.index(r["method"])))
    return {
        "command": "python " + shlex.join(sys.argv),
        "config": environment(args, num_visual),
        "rows": rows,
    }


def environment(args: argparse.Namespace, num_visual: int) -> dict:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(
        visual_tokens=num_visual,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        dtype="float32",
    )
    return config


def to_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"Vision: {cfg['vision_layers']} layers x hidden {cfg['vision_hidden']}, {cfg['visual_tokens']} visual tokens. "
        f"LM: {cfg['lm_layers']} layers (analytic figures: {cfg['full_layers']}) x hidden {cfg['lm_hidden']}, "
        f"ffn {cfg['lm_ffn']}, {cfg['lm_heads']}/{cfg['lm_kv_heads']} heads; {cfg['text_tokens']} text tokens, "
        f"batch {cfg['batch']}, fp32, {cfg['threads']} threads, median of {cfg['repeats']} after {cfg['warmup']} warm-up; "
        f"ZOO m={cfg['zoo_directions']}; generate {cfg['new_tokens']} new tokens.",
        "",
        "| method | tokens | prefill TFLOPs peer (full) | prefill TFLOPs exact (full) | FLOPs reduction | "
        "select GFLOPs | vision ms | select ms | project ms | prefill ms (run depth) | select % of prefill (run / full depth) | "
        "e2e generate ms | KV cache MB (full, fp16) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        reduction = f"{r.get('flops_reduction_exact', 1.0):.2f}x"
        pct = (
            f"{r['select_pct_of_prefill']:.1f}% / {r['select_pct_of_prefill_full_depth']:.2f}%"
            if "select_pct_of_prefill" in r
            else "-"
        )
        lines.append(
            f"| {r['method']} | {r['tokens']} | {r['prefill_tflops_peer_full']:.3g} | {r['prefill_tflops_exact_full']:.3g} | "
            f"{reduction} | {r['select_gflops']:.3g} | {r['vision_ms']:.0f} | {r['select_ms']:.1f} | {r['project_ms']:.0f} | "
            f"{r['prefill_ms']:.0f} | {pct} | {r['e2e_ms']:.0f} | {r['kv_cache_mb_full_fp16']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["method"] != "none"]
    base = result["rows"][0]
    budgets = sorted({r["tokens"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["tokens"])
        ax1.plot([r["tokens"] for r in mine], [r["e2e_ms"] for r in mine], marker="o", label=method)
        ax2.plot(
            [r["tokens"] for r in mine],
            [max(r["select_pct_of_prefill_full_depth"], 1e-3) for r in mine],
            marker="o",
            label=method,
        )
    ax1.axhline(base["e2e_ms"], color="k", ls="--", label=f"unpruned ({base['tokens']})")
    ax1.set(
        xlabel="visual tokens kept",
        ylabel="prepare + generate (ms)",
        title="End-to-end latency",
        xticks=budgets,
    )
    ax2.axhline(5, color="r", ls=":", label="5% target")
    ax2.set(
        xlabel="visual tokens kept",
        ylabel="% of pruned prefill",
        yscale="log",
        xticks=budgets,
        title=f"Selection overhead vs {result['config']['full_layers']}-layer prefill (extrapolated)",
    )
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@entry_point
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "accuracy":
        run_accuracy(args)
        return 0
    if args.quick:
        apply_quick(args)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_speed(args)
    (args.out / "speed.json").write_text(json.dumps(result, indent=2))
    (args.out / "speed.md").write_text(to_markdown(result))
    plot(result, args.out / "speed.png")
    print(to_markdown(result))
    print(f"wrote {args.out}/speed.json, speed.md, speed.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
