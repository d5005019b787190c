"""GaLore basis refresh: full SVD vs the randomized range finder, on real SmolLM2 gradients.

    python benchmarks/basis_refresh.py [--repeats 5]

For the gate/up (1536×576) and down (576×1536) projections of a few layers, takes the real gradient of one demo
batch (and, for warm starts, of a second batch: the subspace GaLore would refresh to), and prints per method the
median refresh time and the share of the gradient's energy the rank-r basis keeps, next to the full SVD's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from owlore.cli import entry_point, exit_code


def gradients(layers: list[int]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from owlore.assets import embedded_model_path
    from owlore.data.demo_tasks import build_demo_tasks
    from owlore.data.sft import tokenize_rows

    path = embedded_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = tokenize_rows(build_demo_tasks("train")[:16], tok, max_seq_length=128)
    names = [f"model.layers.{i}.mlp.{p}.weight" for i in layers for p in ("up_proj", "down_proj")]
    params = dict(model.named_parameters())
    grads = []
    for start in (0, 8):
        batch = [ds[i] for i in range(start, start + 8)]
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.tensor([b["input_ids"] + [tok.pad_token_id or 0] * (width - len(b["input_ids"])) for b in batch])
        labels = torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        grads.append({n: params[n].grad.clone() for n in names})
    return [(n, grads[0][n], grads[1][n]) for n in names]


def timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


@entry_point
def main(argv: list[str]) -> None:
    from owlore.optim.projector import captured_energy, choose_side, compute_basis, randomized_basis

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--layers", default="2,15,29")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name, g0, g1 in gradients([int(x) for x in args.layers.split(",")]):
        side = choose_side("std", g1.shape)
        prev = compute_basis(g0, args.rank, side)
        svd, t_svd = timed(lambda g=g1, s=side: compute_basis(g, args.rank, s), args.repeats)
        e_svd = captured_energy(g1, svd, side)
        rows.append((name, tuple(g1.shape), "svd", t_svd, e_svd, 1.0))
        for label, kw in (("randomized, 0 iters", {"power_iters": 0}), ("randomized, 1 iter", {"power_iters": 1}),
                          ("randomized, 2 iters", {"power_iters": 2}),
                          ("randomized warm, 0 iters", {"power_iters": 0, "warm": prev}),
                          ("randomized warm, 1 iter", {"power_iters": 1, "warm": prev})):
            basis, t = timed(lambda g=g1, s=side, kw=kw: randomized_basis(g, args.rank, s, **kw), args.repeats)
            e = captured_energy(g1, basis, side)
            rows.append((name, tuple(g1.shape), label, t, e, t / t_svd))
    print(f"rank {args.rank}, median of {args.repeats}, {torch.get_num_threads()} threads\n")
    print("| matrix | shape | method | time (ms) | × SVD time | energy kept | vs SVD's |")
    print("|---|---|---|---:|---:|---:|---:|")
    best = {}
    for name, shape, label, t, e, ratio in rows:
        if label == "svd":
            best[name] = e
        print(f"| {name.removeprefix('model.')} | {shape[0]}×{shape[1]} | {label} | {1e3 * t:.1f} | {ratio:.2f} | "
              f"{e:.5f} | {e / best[name]:.5f} |")


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
