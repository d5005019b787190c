"""Pruning speed on LLaVA-NeXT (anyres) and Qwen2-VL layouts: every supported method, measured prefill and analytic FLOPs.

Random weights at the real widths (LLaVA-NeXT-7B: CLIP-L/336 + Vicuna-7B; Qwen2-VL-7B: 1280-wide ViT + Qwen2-7B),
depth cut for CPU (``--vision-layers``, ``--lm-layers``); FLOPs are analytic for the full depth. LLaVA-NeXT runs a
672×672 image (base + 2×2 tiles: 5 × 576 = 2880 crop tokens, 2928 with the newline tokens) and keeps ``--keep``
tokens per crop; Qwen2-VL runs a 672×672 image (48×48 patches → 576 merged tokens) and keeps ``--keep`` tokens.
The vocabulary is cut to 32k for both (it only sizes the embedding lookup and one row of logits).

    python benchmarks/vlm_arch_speed.py --out outputs/vlm_arch_speed      # ~15 min on a quiet 2-core CPU
    python benchmarks/vlm_arch_speed.py --quick                            # tiny sizes, seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from owlore.cli import entry_point, exit_code  # noqa: E402

IMAGE = 32000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["llava_next", "qwen2_vl"], choices=["llava_next", "qwen2_vl"])
    p.add_argument("--keep", type=int, default=64, help="tokens kept per crop (LLaVA-NeXT) / per image (Qwen2-VL)")
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--lm-layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny widths and image, one repeat")
    p.add_argument("--out", type=Path, default=Path("outputs/vlm_arch_speed"))
    return p


def llava_next(args: argparse.Namespace):
    """Model, raw inputs, full-depth LM shape."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from owlore.pruning.flops import LMShape

    q = args.quick
    size, patch = (32, 8) if q else (336, 14)
    vision = CLIPVisionConfig(hidden_size=32 if q else 1024, intermediate_size=64 if q else 4096,
                              num_hidden_layers=args.vision_layers, num_attention_heads=4 if q else 16,
                              image_size=size, patch_size=patch)
    text = LlamaConfig(hidden_size=64 if q else 4096, intermediate_size=128 if q else 11008,
                       num_hidden_layers=args.lm_layers, num_attention_heads=4 if q else 32,
                       num_key_value_heads=4 if q else 32, vocab_size=IMAGE + 64, max_position_embeddings=8192)
    pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size], [3 * size, size], [size, 3 * size]]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                             image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    sizes = torch.tensor([[2 * size, 2 * size]])
    pixels = torch.randn(1, 5, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        placeholders = len(model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output[0])
    ids = torch.tensor([list(range(1, 36)) + [IMAGE] * placeholders + list(range(40, 65))])
    raw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "image_sizes": sizes}
    return model, raw, LMShape(text.hidden_size, text.intermediate_size, 32, text.num_attention_heads,
                               text.num_key_value_heads)


def qwen2_vl(args: argparse.Namespace):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from owlore.pruning.flops import LMShape

    q = args.quick
    hidden, heads = (64, 4) if q else (3584, 28)
    config = Qwen2VLConfig(
        vision_config=dict(depth=args.vision_layers, embed_dim=32 if q else 1280, hidden_size=hidden,
                           num_heads=4 if q else 16, mlp_ratio=4, patch_size=4 if q else 14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        text_config=dict(hidden_size=hidden, intermediate_size=128 if q else 18944, num_hidden_layers=args.lm_layers,
                         num_attention_heads=heads, num_key_value_heads=4, vocab_size=IMAGE + 64,
                         max_position_embeddings=8192, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [2, 3, 3] if q else [16, 24, 24]}),
        image_token_id=IMAGE, video_token_id=IMAGE + 1, vision_start_token_id=IMAGE + 2,
        vision_end_token_id=IMAGE + 3)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    side = 8 if q else 48  # patches per side: 672 / 14
    patch = 4 if q else 14
    pixels = torch.randn(side * side, 3 * 2 * patch * patch, generator=torch.Generator().manual_seed(0))
    tokens = side * side // 4
    ids = torch.tensor([list(range(1, 35)) + [IMAGE + 2] + [IMAGE] * tokens + [IMAGE + 3] + list(range(40, 64))])
    raw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
           "image_grid_thw": torch.tensor([[1, side, side]])}
    return model, raw, LMShape(hidden, 18944 if not q else 128, 28, heads, 4)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(arch: str, args: argparse.Namespace) -> list[dict]:
    from owlore.pruning import VisualTokenPruner, get_method, method_names
    from owlore.pruning.flops import prefill_flops_exact
    from owlore.pruning.models import adapter_for

    model, raw, lm = (llava_next if arch == "llava_next" else qwen2_vl)(args)
    adapter = adapter_for(model)
    methods = [m for m in method_names() if adapter.unsupported(get_method(m)) is None]
    n = adapter.encode(model, raw["pixel_values"], attention=False, attn_layer=None,
                       **{k: v for k, v in raw.items() if k in ("image_sizes", "image_grid_thw")})[0].features.shape[1]
    rows = []
    for method, keep in [("none", n)] + [(m, args.keep) for m in methods]:
        pruner = VisualTokenPruner("random" if method == "none" else method, keep)
        with torch.no_grad():
            prepare_ms = _median_ms(lambda p=pruner: p.prepare(model, **raw), args.repeats)
            inputs = pruner.prepare(model, **raw)
            prefill_ms = _median_ms(lambda i=inputs: model(**i, logits_to_keep=1), args.repeats)
        length = int(inputs["attention_mask"].sum())
        visual = int((inputs["input_ids"] == IMAGE).sum())
        rows.append({"arch": arch, "method": method, "keep": keep, "visual_tokens": visual, "prompt_tokens": length,
                     "prepare_ms": prepare_ms, "select_ms": pruner.last_stats["select_s"] * 1e3,
                     "prefill_ms": prefill_ms, "prefill_tflops_full": prefill_flops_exact(length, lm) / 1e12})
        print(f"{arch:>10} {method:>10}: {visual} visual tokens, prepare {prepare_ms:.0f} ms, prefill "
              f"{prefill_ms:.0f} ms", flush=True)
    base = rows[0]
    for r in rows:
        r["prefill_speedup"] = base["prefill_ms"] / r["prefill_ms"]
        r["flops_reduction"] = base["prefill_tflops_full"] / r["prefill_tflops_full"]
    return rows


def to_markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| model | method | visual tokens | prefill TFLOPs (full depth) | FLOPs reduction | prepare ms "
             "(vision + select + project) | select ms | prefill ms (run depth) | prefill speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['method']} | {r['visual_tokens']} | {r['prefill_tflops_full']:.3g} | "
                     f"{r['flops_reduction']:.2f}x | {r['prepare_ms']:.0f} | {r['select_ms']:.1f} | "
                     f"{r['prefill_ms']:.0f} | {r['prefill_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


@entry_point
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.vision_layers, args.lm_layers, args.repeats = 2, 2, 1
        args.keep = min(args.keep, 4)
    torch.set_num_threads(args.threads)
    rows = [r for arch in args.arch for r in measure(arch, args)]
    command = "python " + shlex.join(sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arch_speed.json").write_text(json.dumps({"command": command, "torch": torch.__version__,
                                                          "threads": args.threads, "rows": rows}, indent=2))
    (args.out / "arch_speed.md").write_text(to_markdown(rows, command))
    print(to_markdown(rows, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
