"""Scale-out on the real model: gradient bytes all-reduced per step, and 2 processes vs 1 (losses, weights).

    python benchmarks/scale_out.py [--methods full,lora,galore,lisa,badam,owlore] [--steps 3] [--out outputs/scale_out]

For each method it runs the shipped ``configs/smollm2_<method>.yaml`` on SmolLM2-135M twice: on one process with
batch 2, and under ``torchrun --nproc_per_node 2`` with batch 1 per rank (the same global batch). It reports the
bytes each step all-reduces, optimizer state and peak RSS over the post-load RSS per rank (rank 0's record) (DDP's buckets, counted by a comm hook, for full/lora/galore; the active-gradient reducer
for the layer-switching methods), the ratio to full fine-tuning, and the largest difference of the logged losses and
of the saved weights between the two runs. Output: ``scale_out.json`` and ``scale_out.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from owlore.benchmark.runs import run_process  # noqa: E402
from owlore.cli import entry_point, exit_code  # noqa: E402
from owlore.errors import UsageError  # noqa: E402
from owlore.methods import names_where  # noqa: E402

# every registered method but the optional extras and a 4-bit base (bitsandbytes places it with a device_map,
# outside this CPU data-parallel check); FSDP2 for the methods that declare it (owlore.methods.base.Method)
METHODS = names_where(lambda m: not m.extras and not m.memory.quantized_base)
FSDP2 = names_where(lambda m: m.fsdp2)
MiB = 2**20
# glibc returns freed large blocks to the OS only above the mmap threshold, so RSS would keep what sharding freed
# (eval/bench.py sets the same, for the same reason)
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    final = run / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(final / name))


@entry_point
def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", default="outputs/scale_out")
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = []
    methods = args.methods.split(",")
    unknown = [m for m in methods if not (ROOT / "configs" / f"smollm2_{m}.yaml").is_file()]
    if unknown:
        raise UsageError(f"--methods {args.methods}: no configs/smollm2_<method>.yaml for {', '.join(unknown)}; "
                         f"known: {', '.join(METHODS)}")
    for method in methods:
        common = ["--config", str(ROOT / "configs" / f"smollm2_{method}.yaml"), f"training.max_steps={args.steps}",
                  f"data.max_seq_length={args.seq}", "training.save_strategy=no", "training.logging_steps=1",
                  "training.report_to=[]", "eval.demo=false", "training.disable_tqdm=true"]
        runs = {}
        for world in (1, 2, "fsdp2") if method in FSDP2 else (1, 2):
            d = out / f"{method}_{world}"
            shutil.rmtree(d, ignore_errors=True)
            cmd = [sys.executable, "train.py", *common, f"training.output_dir={d}",
                   f"training.per_device_train_batch_size={1 if world != 1 else 2}"]
            if world == "fsdp2":
                cmd[2:2] = ["--config", str(ROOT / "configs" / "scale" / "fsdp2.yaml")]
            if world != 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       str(_port()), *cmd[1:]]
            t = time.perf_counter()
            rc, err = run_process(cmd, d, cwd=ROOT, who="scale_out.py", env=ENV)
            if rc:
                raise SystemExit(f"{method} on {world} process(es) failed ({rc}):\n{err}")
            runs[world] = json.loads((d / "owlore_record.json").read_text())["summary"]
            runs[world]["wall"] = time.perf_counter() - t
        one, two = runs[1], runs[2]
        w1, w2 = _weights(out / f"{method}_1"), _weights(out / f"{method}_2")
        sharded = runs.get("fsdp2")
        w3 = _weights(out / f"{method}_fsdp2") if sharded else None
        rows.append({
            "peak_over_load_mib": {str(k): (r["peak_memory_bytes"] - r["rss_after_load_bytes"]) / MiB
                                   for k, r in runs.items()},
            "optimizer_state_mib": {str(k): r["optimizer_state_bytes"] / MiB for k, r in runs.items()},
            "fsdp2_max_loss_diff": max(abs(a - b) for a, b in zip(one["log_losses"], sharded["log_losses"]))
            if sharded else None,
            "fsdp2_max_weight_diff": max((w1[k].float() - w3[k].float()).abs().max().item() for k in w1)
            if sharded else None,
            "method": method,
            "trainable": two["trainable_parameters"],
            "bytes_per_step": two.get("comm_bytes_per_sync"),
            "max_loss_diff": max(abs(a - b) for a, b in zip(one["log_losses"], two["log_losses"])),
            "max_weight_diff": max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1),
            "steps": len(two["log_losses"]),
        })
        for world in runs:
            shutil.rmtree(out / f"{method}_{world}" / "final", ignore_errors=True)  # 0.5 GB each
    full = next((r["bytes_per_step"] for r in rows if r["method"] == "full"), None)
    lines = ["| method | trainable at the end | DDP: all-reduced / step (MiB) | × full | DDP max Δ loss / weight | "
             "optimizer state MiB (1 proc / DDP rank / FSDP2 rank) | peak over load MiB (1 / DDP / FSDP2) | "
             "FSDP2 max Δ loss / weight |", "|---|---:|---:|---:|---|---|---|---|"]

    def triple(d):
        return " / ".join(f"{d[k]:.0f}" if k in d else "–" for k in ("1", "2", "fsdp2"))

    for r in rows:
        ratio = f"{r['bytes_per_step'] / full:.3f}" if full and r["bytes_per_step"] else "–"
        fs = (f"{r['fsdp2_max_loss_diff']:.1e} / {r['fsdp2_max_weight_diff']:.1e}"
              if r["fsdp2_max_loss_diff"] is not None else "–")
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['bytes_per_step'] / MiB:.1f} | {ratio} | "
                     f"{r['max_loss_diff']:.1e} / {r['max_weight_diff']:.1e} | {triple(r['optimizer_state_mib'])} | "
                     f"{triple(r['peak_over_load_mib'])} | {fs} |")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_out.json").write_text(json.dumps(rows, indent=1))
    (out / "scale_out.md").write_text(f"`python benchmarks/scale_out.py {' '.join(argv or sys.argv[1:])}`\n\n{text}\n")
    print(text)
    return {"rows": rows}


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
