"""Optimizer step time with and without GaLore projection on SmolLM2-135M MLP matrix shapes.

GaLore (arXiv 2403.03507) trades an SVD every ``update_proj_gap`` steps and two small matmuls per step for
low-rank Adam moments; OwLore (arXiv 2405.18380) uses it on the sampled layers. This prints, per shape and rank,
the first step (includes the SVD), the median steady-state step and the optimizer-state size, as a markdown table.

    .venv/bin/python benchmarks/optimizer_step.py [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from owlore.cli import entry_point, exit_code
from owlore.optim.galore_adamw import GaLoreAdamW

SHAPES = {"gate/up_proj": (1536, 576), "down_proj": (576, 1536)}  # nn.Linear weight is [out, in]


def measure(kind: str, shape: tuple[int, int], rank: int | None, repeats: int) -> dict[str, float]:
    """Time one fresh optimizer on one weight: first step, then ``repeats`` steady-state steps."""
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(0.02 * torch.randn(shape, generator=gen))
    grads = [torch.randn(shape, generator=gen) for _ in range(2)]
    if kind == "torch":
        opt: torch.optim.Optimizer = torch.optim.AdamW([weight], lr=1e-3, eps=1e-6)
    elif rank is None:
        opt = GaLoreAdamW([weight], lr=1e-3)
    else:  # a huge gap keeps the SVD out of the steady-state steps
        opt = GaLoreAdamW(
            [{"params": [weight], "rank": rank, "update_proj_gap": 10**9, "scale": 0.25}], lr=1e-3
        )
    times = []
    for i in range(repeats + 1):
        weight.grad = grads[i % 2]
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    state = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )
    return {
        "first_ms": 1e3 * times[0],
        "steady_ms": 1e3 * statistics.median(times[1:]),
        "svd_ms": 1e3 * getattr(opt, "svd_seconds", 0.0),
        "state_mb": state / 2**20,
    }


@entry_point
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="steady-state steps per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.linalg.svd(torch.randn(64, 32), full_matrices=False)  # load LAPACK before the first timed step

    configs = [("torch", None, "torch.optim.AdamW"), ("galore", None, "GaLoreAdamW, no projection")]
    configs += [("galore", r, f"GaLoreAdamW, rank {r}") for r in (128, 256)]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU, median of {args.repeats} steps\n"
    )
    print(
        "| matrix | shape | optimizer | first step (ms) | of which SVD (ms) | steady step (ms) | state (MB) |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for name, shape in SHAPES.items():
        for kind, rank, label in configs:
            r = measure(kind, shape, rank, args.repeats)
            print(
                f"| {name} | {shape[0]}x{shape[1]} | {label} | {r['first_ms']:.2f} | {r['svd_ms']:.2f} "
                f"| {r['steady_ms']:.2f} | {r['state_mb']:.2f} |"
            )


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
