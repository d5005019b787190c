"""Benchmark training methods side by side: memory by tensor kind, peak memory, step time, SVD cost, loss.

    python eval/bench.py --methods full,lora,qlora,galore,lisa,badam,owlore --steps 20 [--batch 4] [--seq 128]
        [--repeats 3] [--base configs/smollm2.yaml] [--out outputs/bench] [--demo [--demo-limit 10]]
        [--variants owlore_opt=owlore:memory.chunked_loss=1024,optimizer.update_in_backward=true,training.max_grad_norm=0]
        [--variants owlore+ckpt=owlore:memory.checkpointing=frozen] [--no-malloc-env] [--timeout S]
        [section.key=value ...]              # every run, e.g. model.name=... data.train=...
        [method:section.key=value ...]       # that method's columns, e.g. lisa:lisa.state_policy=keep
        [label:section.key=value ...]        # one --variants column only

Each column (a method, or a ``--variants label=method:override,...`` entry, so one method can appear with and
without options) is a fresh ``train.py`` process per repeat, as in ``eval/compare.py`` (``owlore.comparison``:
same model, data, batch and steps; repeats interleaved; ratios to ``full`` within a repeat), with
``memory.profile=true`` (``owlore.memory.probe``: live weights, gradients, optimizer state and saved activations
by kind at each step) and the demo evaluation off (``--demo`` turns it on). Per column: peak RSS and peak minus
the post-load RSS (CUDA: max allocated, minus the allocation at train begin, and max reserved), live tensor bytes
by kind at the peak step, median step time after warm-up and the slowest step over the median (a layer switch's
SVD burst), tokens/s, GaLore SVD seconds per layer switch, trainable parameters, final loss. Writes
``<out>/bench.json`` (runs, aggregates, the optimizer-state curves), ``<out>/bench.md`` and ``<out>/bench.png``
((a) stacked bytes by kind, (b) optimizer state per step of the layer-switching methods, (c) step times).

glibc: freed activations stay in the heap between steps (its mmap threshold rises after the first large free,
so later blocks come from the heap, where fragmentation keeps them), which puts hundreds of MiB of freed memory
into the peak RSS. Child processes therefore get ``MALLOC_MMAP_THRESHOLD_=65536`` (a fixed threshold: every
block over 64 KiB is mmap'ed and returned to the OS when freed), unless already set in the environment. Measured
on full fine-tuning of SmolLM2 (batch 4, seq 128, fp32, CPU): peak − post-load RSS 1788-1790 MiB instead of
2042-2062, RSS between steps 2128 MiB (post-load + Adam state) instead of ~2570, against 1539 MiB of live tensors
above the weights (the rest: optimizer and loss temporaries the probe does not count). The price is page faults:
2.2x the minor faults, ~0.6 s more system time per step there, more for methods that allocate more, so step-time
ratios lean a little towards the lean methods. Results are unchanged. ``--no-malloc-env`` runs with glibc's
defaults (use it when step time is what you measure).

Optimizer state over a long run, where LISA with LMFlow's ``state_policy=keep`` grows with every layer it has
visited while OwLore's (``reset``) stays at γ layers: sample often enough that every layer comes up, e.g. for
SmolLM2's 30 layers with γ=4, 60 draws (P(some layer never drawn) < 1 %):

    python eval/bench.py --methods lisa,owlore --variants lisa_keep=lisa:lisa.state_policy=keep --steps 60 \\
        --batch 1 --seq 64 lisa:lisa.interval=1 owlore:owlore.interval=1

and look at panel (b) of bench.png (``optimizer_state_series`` in bench.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from owlore import bench
from owlore import comparison as cmp

REPO = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench")
RECORD = cmp.RECORD
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""Set in every child unless already in the environment (see the module docstring; ``--no-malloc-env``)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,lora,qlora,galore,lisa,badam,owlore",
                   help="comma-separated methods (owlore/methods registry), one column each")
    p.add_argument("--variants", action="append", default=[], metavar="LABEL=METHOD[:KEY=VALUE,...]",
                   help="an extra column running METHOD with these overrides (repeat the flag for more)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=4, help="per-device train batch size")
    p.add_argument("--seq", type=int, default=128, help="data.max_seq_length")
    p.add_argument("--repeats", type=int, default=1, help="run the columns this many times, interleaved")
    p.add_argument("--base", type=Path,
                   help="run every method as --config BASE method=<name> (default: configs/smollm2_<method>.yaml, "
                        "or configs/smollm2.yaml for a method without one)")
    p.add_argument("--config-dir", type=Path, default=Path("configs"), help="where smollm2_<method>.yaml live")
    p.add_argument("--out", type=Path, default=Path("outputs/bench"))
    p.add_argument("--demo", action="store_true", help="run the demo evaluation before and after (slower)")
    p.add_argument("--demo-limit", type=int, help="demo items per task type (implies --demo)")
    p.add_argument("--no-malloc-env", action="store_true",
                   help=f"do not set {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())} in the runs")
    p.add_argument("--timeout", type=float, help="seconds per run before it is killed and counted as failed")
    p.add_argument("--keep-models", action="store_true", help="keep each run's final/ model")
    p.add_argument("overrides", nargs="*",
                   help="section.key=value for every run; method:section.key=value or label:section.key=value "
                        "for those columns only")
    return p


def columns(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, tuple[str, list[str]]]:
    """``{label: (method, overrides)}`` in column order, or a parser error naming every problem."""
    from owlore.methods import REGISTRY

    cols: dict[str, tuple[str, list[str]]] = {m.strip(): (m.strip(), []) for m in args.methods.split(",")
                                              if m.strip()}
    problems = [f"unknown methods {[m for m in cols if m not in REGISTRY]} (known: {', '.join(REGISTRY)})"] \
        if any(m not in REGISTRY for m in cols) else []
    for text in args.variants:
        try:
            label, method, overrides = bench.parse_variant(text)
        except ValueError as e:
            problems.append(str(e))
            continue
        if method not in REGISTRY:
            problems.append(f"--variants {text!r}: unknown method {method!r} (known: {', '.join(REGISTRY)})")
        elif label in cols or label in REGISTRY:
            problems.append(f"--variants {text!r}: label {label!r} is taken; choose another, e.g. {method}_opt")
        cols[label] = (method, overrides)
    names = {*cols, *REGISTRY}
    bad = [o for o in args.overrides if "=" not in o or (":" in o.split("=")[0] and o.split(":")[0] not in names)]
    if bad:
        problems.append(f"overrides must be [method:|label:]section.key=value: {bad}")
    if not cols or args.steps < 1 or args.repeats < 1:
        problems.append("need at least one column, --steps >= 1 and --repeats >= 1")
    if problems:
        parser.error("; ".join(problems))
    return cols


def child_env(malloc: bool) -> dict[str, str]:
    """The environment of a run: ours, no tokenizer threads, and (unless off or set already) ``MALLOC_ENV``."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")}
    if malloc:
        env = {**MALLOC_ENV, **env}
    return env


def run_one(cmd: list[str], out_dir: Path, timeout: float | None, env: dict[str, str]) -> tuple[int, str]:
    """Run one training process with its logs in ``out_dir``; the exit code and the stderr tail."""
    return cmp.run_process(cmd, out_dir, cwd=REPO, timeout=timeout, env=env, who="bench.py")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    cols = columns(parser, args)
    demo = args.demo or args.demo_limit is not None
    config_dir = args.config_dir if args.config_dir.is_absolute() else REPO / args.config_dir
    base = args.base or Path("configs/smollm2.yaml")
    base = base if base.is_absolute() else REPO / base
    out = args.out.resolve()
    env = child_env(not args.no_malloc_env)
    command = shlex.join(["python", "eval/bench.py", *(argv if argv is not None else sys.argv[1:])])
    malloc = " ".join(f"{k}={env[k]}" for k in MALLOC_ENV if k in env) or "glibc's malloc defaults"
    settings = {"steps": args.steps, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
                "malloc_env": malloc, **({"demo_limit": args.demo_limit} if args.demo_limit is not None else {})}
    fixed = ["memory.profile=true", *([] if demo else ["eval.demo=false"])]

    rows: list[dict] = []
    plan = cmp.schedule(list(cols), args.repeats)
    for i, (repeat, label) in enumerate(plan, 1):
        method, own = cols[label]
        run_out = cmp.run_dir(out, label, repeat, args.repeats)
        cmd = cmp.run_command(method, steps=args.steps, batch=args.batch, seq=args.seq, output_dir=run_out,
                              config_dir=config_dir, base=base, base_given=args.base is not None,
                              demo_limit=args.demo_limit,
                              overrides=[*fixed, *own, *cmp.column_overrides(label, method, args.overrides)],
                              script=str(REPO / "train.py"))
        logger.info("[%d/%d] %s (repeat %d/%d): %s", i, len(plan), label, repeat + 1, args.repeats, shlex.join(cmd))
        t0 = time.perf_counter()
        rc, err_tail = run_one(cmd, run_out, args.timeout, env)
        row = _read_row(run_out / RECORD, rc, err_tail, label=label, method=method, repeat=repeat, args=args)
        if row["status"] == "ok":
            if not args.keep_models:
                shutil.rmtree(run_out / "final", ignore_errors=True)
            logger.info("[%d/%d] %s ok in %.0f s: median step %s s, peak +%.0f MiB above the model, live tensors "
                        "+%.0f MiB above the weights", i, len(plan), label, time.perf_counter() - t0,
                        f"{row['step_median_s']:.3f}" if row["step_median_s"] is not None else "–",
                        (row["memory_above_load_bytes"] or 0) / cmp.MIB,
                        (row["live_above_weights_bytes"] or 0) / cmp.MIB)
        else:
            logger.error("[%d/%d] %s FAILED (exit %d); stderr tail:\n%s", i, len(plan), label, row["returncode"],
                         row["stderr_tail"])
        row["output_dir"], row["command"] = str(run_out), cmd
        rows.append(row)
        _write(out, rows, command, settings, cols)  # partial results survive an interrupted benchmark
    failed = [r for r in rows if r["status"] != "ok"]
    logger.info("wrote %s, %s and %s%s", out / "bench.json", out / "bench.md", out / "bench.png",
                f"; {len(failed)} of {len(rows)} runs failed" if failed else "")
    print("\n" + (out / "bench.md").read_text())
    return 1 if failed else 0


def _read_row(record_path: Path, rc: int, err_tail: str, *, label: str, method: str, repeat: int,
              args: argparse.Namespace) -> dict:
    if rc == 0 and record_path.is_file():
        try:
            return bench.parse_bench_record(json.loads(record_path.read_text()), label=label, method=method,
                                            repeat=repeat, batch=args.batch, seq=args.seq)
        except (KeyError, TypeError, ValueError) as e:  # a record from an older train.py, a cut-off file
            rc, err_tail = 1, f"unreadable {record_path}: {e!r}\n{err_tail}"
    elif rc == 0:
        rc, err_tail = 1, f"exit 0 but no {record_path}\n{err_tail}"
    return {**cmp.failed_row(label, repeat, rc, err_tail), "base_method": method}


def _write(out: Path, rows: list[dict], command: str, settings: dict, cols: dict) -> None:
    agg = bench.aggregate(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(
        {"command": command, "settings": settings,
         "columns": {k: {"method": m, "overrides": o} for k, (m, o) in cols.items()},
         "runs": rows, "aggregate": agg}, indent=1, default=str))
    (out / "bench.md").write_text(bench.render_markdown(agg, command=command, settings=settings))
    bench.plot_bench(agg, rows, out / "bench.png", title=", ".join(f"{k} {v}" for k, v in settings.items()))


if __name__ == "__main__":
    sys.exit(main())
