"""Check your install on a GPU: the CUDA tests, memory against the estimator, step times, prefill with pruning.

    python benchmarks/device_check.py [--out outputs/device_check] [--quick]

One command, nothing from the network (the embedded SmolLM2, tiny or random-init models only), about 8 minutes
on one CUDA GPU. Prints one table (check, result, figures) and exits non-zero when a check fails:

1. ``pytest -m cuda`` (``tests/test_cuda.py``): fused / projected GaLoreAdamW, chunked loss in bf16, int8 frozen
   layers' asynchronous host copies, in-backward updates, CUDA-event step timing, VQA scoring and pruning.
2. Optimizer step of the whole SmolLM2 (``benchmarks/optimizer_kernels.py``): per-param loop, foreach, fused,
   and ``torch.optim.AdamW(fused=True)`` on the same tensors.
3. Memory (``benchmarks/memory_validation.py``): every method on SmolLM2, OwLore with checkpointing with and
   without ``memory.offload_activations``, and 7B-width models cut to 2 and 4 layers:
   ``torch.cuda.max_memory_allocated`` during training beside the estimator's figure (the ±15 % claim), and each
   method's median step time over full fine-tuning's from the same records.
4. Prefill, pruned vs unpruned, on the LLaVA-1.5 layout (``eval/vlm_pruning.py speed``, depth-reduced).

Without CUDA it runs the CPU subset (2, and 4 at tiny sizes), says what it skipped, and step 1 reports the CUDA
tests as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from owlore.cli import entry_point, exit_code

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], timeout: int) -> tuple[int, str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {timeout} s\n{e.stdout or ''}", time.perf_counter() - start


def check_cuda_tests(cuda: bool) -> dict:
    rc, out, secs = _run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"], 300)
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    if not cuda:
        ok = rc in (0, 5) and "failed" not in tail
        return {"check": "pytest -m cuda", "ok": ok, "result": "skipped: no CUDA GPU" if ok else tail,
                "figures": tail, "seconds": secs}
    return {"check": "pytest -m cuda", "ok": rc == 0 and "skipped" not in tail.split("passed")[0], "result": tail,
            "figures": tail, "seconds": secs, "log": out if rc else ""}


def check_optimizer(cuda: bool, quick: bool) -> dict:
    cmd = [sys.executable, "benchmarks/optimizer_kernels.py", "--repeats", "3" if quick else "5"]
    cmd += ["--device", "cuda", "--dtype", "bfloat16"] if cuda else ["--layers", "2"]
    rc, out, secs = _run(cmd, 300)
    rows = dict(re.findall(r"^\| (\S+) \| ([0-9.]+) \|", out, re.M))
    figures = ", ".join(f"{k} {float(v) * 1e3:.1f} ms" for k, v in rows.items())
    ran = rc == 0 and "fused" in rows
    # a regression to the per-param loop is ~5x; 2x leaves room for a noisy host. The bound is the verdict on a GPU,
    # the machine this check is for; on a shared CPU host it is reported, not enforced (steal time alone moved the
    # CPU ratio from 1.5x to 3.6x between two runs of the same code)
    fast = ran and float(rows["fused"]) < float(rows["loop"]) \
        and float(rows["fused"]) <= 2 * float(rows.get("torch-fused", rows["fused"]))
    ok = fast if cuda else ran
    result = "ok" if fast else (f"exit {rc}" if not ran else "ran; timing bound (fused <= 2x torch-fused) not met"
                                + ("" if cuda else ", enforced on CUDA only"))
    return {"check": "optimizer step (fused vs torch fused)", "ok": ok, "result": result,
            "figures": figures or out[-300:], "seconds": secs}


def check_memory(cuda: bool, out_dir: Path, quick: bool) -> list[dict]:
    if not cuda:
        return [{"check": "memory vs estimator", "ok": True, "result": "skipped: needs a CUDA GPU",
                 "figures": "CPU RSS figures: docs/memory.md (make memory-tables)", "seconds": 0.0}]
    out = out_dir / "memory"
    cases = "smollm2,options" if quick else "smollm2,options,wide"
    from owlore.methods import names_where

    only = [f"smollm2 {m}" for m in names_where(lambda m: not m.extras and not m.memory.quantized_base)]
    only += ["smollm2 owlore+emb checkpointing=all", "smollm2 owlore+emb offload_activations"]  # the 7B lever
    only += [] if quick else [f"7B-width L{n} {m}" for n in (2, 4) for m in ("owlore", "lisa", "full")]
    rc, log, secs = _run([sys.executable, "benchmarks/memory_validation.py", "--cases", cases, "--steps", "3",
                          "--wide-layers", "2,4", "--only", ",".join(only), "--out", str(out)], 420)
    path = out / "validation.json"
    if not path.is_file():
        return [{"check": "memory vs estimator", "ok": False, "result": f"exit {rc}", "figures": log[-400:],
                 "seconds": secs}]
    rows = json.loads(path.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    steps = {}
    for r in rows:
        record = out / r["case"].replace(" ", "_") / "owlore_record.json"
        if record.is_file():
            s = json.loads(record.read_text())["summary"]["step_seconds"][1:]
            steps[r["case"]] = statistics.median(s) if s else None
    base = next((v for k, v in steps.items() if k.endswith("full") and "wide" not in k), None)
    results = []
    for r in rows:
        err = r.get("error_pct")
        ok = err is not None and abs(err) <= 15
        ratio = steps.get(r["case"]) / base if base and steps.get(r["case"]) else None
        results.append({"check": f"memory {r['case']}", "ok": ok, "result": "ok" if ok else r.get("error", "off")[:80],
                        "figures": (f"measured {r.get('measured_above_load', 0) / 2**20:.0f} MiB, estimate "
                                    f"{r.get('estimate_above_load', 0) / 2**20:.0f} MiB ({err:+.1f} %)"
                                    if err is not None else "")
                        + (f", step {ratio:.2f}x full" if ratio else ""), "seconds": secs / max(len(rows), 1)})
    return results


def check_prefill(cuda: bool, out_dir: Path) -> dict:
    cmd = [sys.executable, "eval/vlm_pruning.py", "speed", "--methods", "divprune", "fastv", "--budgets", "64",
           "--repeats", "3", "--out", str(out_dir / "prefill")]
    cmd += ["--device", "cuda", "--dtype", "bfloat16", "--lm-layers", "4"] if cuda else ["--quick"]
    rc, out, secs = _run(cmd, 300)
    base = re.search(r"baseline (\d+) tokens: prefill ([0-9.]+) ms", out)
    pruned = re.findall(r"(\w+)\s+\d+: select ([0-9.]+) ms, prefill ([0-9.]+) ms", out)
    figures = (f"unpruned {base.group(2)} ms ({base.group(1)} tokens)" if base else out[-300:])
    figures += "".join(f"; {m} {float(p):.0f} ms (select {float(sel):.1f} ms)" for m, sel, p in pruned)
    ok = rc == 0 and bool(pruned)
    return {"check": "prefill, pruned vs unpruned" + ("" if cuda else " (CPU, tiny)"), "ok": ok,
            "result": "ok" if ok else f"exit {rc}", "figures": figures, "seconds": secs}


@entry_point
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "device_check")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and only the SmolLM2 memory cases")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if cuda else "no CUDA GPU: the CPU subset"
    print(f"device check on {device}, torch {torch.__version__}", flush=True)
    results = [check_cuda_tests(cuda), check_optimizer(cuda, args.quick), *check_memory(cuda, args.out, args.quick),
               check_prefill(cuda, args.out)]
    print("\n| check | ok | result | figures | s |\n|---|---|---|---|---:|")
    for r in results:
        print(f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {r['result']} | {r['figures']} | {r['seconds']:.0f} |")
    (args.out / "device_check.json").write_text(json.dumps({"device": device, "results": results}, indent=1))
    failed = [r["check"] for r in results if not r["ok"]]
    for r in results:
        if r.get("log"):
            print(f"\n--- {r['check']} ---\n{r['log'][-3000:]}")
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
