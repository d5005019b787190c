"""GaLoreAdamW's step time per kernel path (per-param loop, torch foreach, torch fused) and torch's own AdamW.

    python benchmarks/optimizer_kernels.py [--model .cache/models/smollm2-135m-instruct] [--layers 4]
        [--rank 0] [--repeats 5] [--dtype float32] [--device cpu]

The model is built from its config (random weights; no download), every trained tensor gets a random gradient,
and each implementation takes one warm-up step and then ``--repeats`` timed steps, interleaved round-robin so
that a noisy host slows all of them alike. ``--layers N`` trains N decoder layers plus embeddings, head and norms
(LISA / BAdam / OwLore's shape of a step); ``--rank R`` projects those layers' linears at rank R (OwLore's
GaLore path, which stays per-param). Prints a markdown table: median, min-max, ratio to the loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from owlore.cli import entry_point, exit_code  # noqa: E402
from owlore.layerwise.layers import find_decoder_layers  # noqa: E402
from owlore.optim.galore_adamw import GaLoreAdamW  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_params(model_path: str, layers: int | None, dtype: torch.dtype, device: torch.device):
    """The trained tensors of a LISA-shaped step: ``layers`` decoder layers (all if None) plus the rest."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from owlore.run.sources import check_model_source

    config = AutoConfig.from_pretrained(check_model_source(model_path, key="--model"))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    decoder = find_decoder_layers(model)
    chosen = list(decoder) if layers is None else list(decoder)[:layers]
    in_layers = {id(p) for layer in decoder for p in layer.parameters()}
    layer_params = [p for layer in chosen for p in layer.parameters()]
    rest = [p for p in model.parameters() if id(p) not in in_layers]
    for p in (*layer_params, *rest):
        p.grad = torch.randn_like(p)
    return layer_params, rest


def make_optimizer(impl: str, layer_params, rest, rank: int) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in layer_params if p.dim() == 2], **({"rank": rank} if rank else {})},
              {"params": [p for p in layer_params if p.dim() != 2] + rest}]
    if impl == "torch-fused":
        return torch.optim.AdamW([g["params"] for g in groups][0] + groups[1]["params"], lr=1e-4, fused=True)
    options = {"loop": {"fused": False, "foreach": False}, "foreach": {"fused": False}, "fused": {}}[impl]
    return GaLoreAdamW(groups, lr=1e-4, **options)


@entry_point
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".cache/models/smollm2-135m-instruct")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers trained (default: all)")
    parser.add_argument("--rank", type=int, default=0, help="GaLore rank of the layers' linears (0: none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    layer_params, rest = build_params(args.model, args.layers, dtype, device)
    impls = ["loop", "foreach", "fused"] + ([] if args.rank else ["torch-fused"])
    optimizers = {impl: make_optimizer(impl, layer_params, rest, args.rank) for impl in impls}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for opt in optimizers.values():  # warm-up: state allocation, first basis
        opt.step()
    for _ in range(args.repeats):
        for impl, opt in optimizers.items():
            _sync(device)
            start = time.perf_counter()
            opt.step()
            _sync(device)
            times[impl].append(time.perf_counter() - start)
    n = sum(p.numel() for p in (*layer_params, *rest))
    print(f"optimizer step, {n / 1e6:.1f} M trained params ({len(layer_params) + len(rest)} tensors), "
          f"{args.dtype} on {device}, layers={args.layers or 'all'}, rank={args.rank or 'none'}, "
          f"{args.repeats} interleaved repeats after one warm-up step")
    print("\n| implementation | median s | min-max s | x loop |\n|---|---|---|---|")
    base = statistics.median(times["loop"])
    for impl, ts in times.items():
        med = statistics.median(ts)
        print(f"| {impl} | {med:.3f} | {min(ts):.3f}-{max(ts):.3f} | {med / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
