"""Benchmark training methods side by side: quality, forgetting, memory by kind, step time, tokens/s, loss.

    python eval/bench.py --sweep benchmarks/sweeps/manpages_methods.yaml        # a quality sweep (resumable)
    python eval/bench.py --methods full,lora,owlore --steps 20 [--batch 4] [--seq 128] [--pack] [--repeats 3]
        [--variants owlore_opt=owlore:memory.chunked_loss=1024,optimizer.update_in_backward=true]
        [--task configs/tasks/manpages.yaml] [--lr 3e-4,1e-3] [--seeds 0,1,2] [--select answers:validation.rougeL]
        [--out outputs/bench] [--no-malloc-env] [--timeout S] [--report-only] [--dry-run]
        [section.key=value ...]  [method:section.key=value ...]  [label:section.key=value ...]

One runner for every comparison. Each run is a fresh ``train.py`` process (``owlore.benchmark.runs``: the
method's ``configs/smollm2_<method>.yaml`` or ``--base``, plus the task overlay, the same batch, steps and
schedule), with the memory probe on (live weights, gradients, optimizer state, activations by kind), losses
logged each step and real (non-padding) tokens counted. Its record gives one row (``owlore.benchmark.records``):
peak memory and peak above the loaded model, bytes by kind, median and slowest step, tokens/s, final loss, and
every evaluation the run made (demo accuracy, answer EM / F1 / ROUGE-L, perplexities, forgetting against the
base model). Rows are aggregated per column and learning rate over seeds and repeats; a column's learning rate
is chosen on the sweep's ``select`` metric (a *validation* split), and its held-out metrics reported at that
rate (``owlore.benchmark.aggregate``). Writes ``<out>/bench.json`` (every run, the aggregates, the whole grid),
``<out>/bench.md`` and the plots ``bench.png`` (memory by kind, optimizer state, step times) and, with a
quality metric, ``pareto.png`` (held-out quality vs memory).

A rerun with the same plan skips every finished run (its ``run.json`` holds the same command), so a sweep that
was stopped resumes where it stopped; ``--report-only`` rewrites the report from the runs on disk.

Memory: child processes get ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc returns freed blocks to the OS, so peak RSS
follows live bytes; measured 1788-1790 MiB instead of 2042-2062 MiB on full FT of SmolLM2), unless it is set
already or ``--no-malloc-env`` (use that when step time is what you measure: the page faults cost ~0.6 s/step).
``--pack`` makes every row exactly ``--seq`` tokens (``data.packing=true``), so "seq 128" means 128 real tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from owlore.benchmark import aggregate, records, report, runs  # noqa: E402
from owlore.benchmark.sweep import Sweep, SweepError, load_sweep  # noqa: E402
from owlore.cli import entry_point, exit_code  # noqa: E402

logger = logging.getLogger("bench")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", type=Path, help="a sweep file (benchmarks/sweeps/*.yaml): the whole plan")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (owlore/methods registry), a column each; all: every registered one")
    p.add_argument("--variants", action="append", default=[], metavar="LABEL=METHOD[:KEY=VALUE,...]",
                   help="an extra column running METHOD with these overrides (repeat the flag for more)")
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=4, help="per-device train batch size")
    p.add_argument("--seq", type=int, default=128, help="data.max_seq_length")
    p.add_argument("--pack", action="store_true", help="pack rows into blocks of exactly --seq tokens")
    p.add_argument("--task", type=Path, help="config overlay for every run, e.g. configs/tasks/manpages.yaml")
    p.add_argument("--lr", help="comma-separated learning-rate grid for every column; with --sweep: run only these "
                                "rates of its grid this time (the rest stays planned)")
    p.add_argument("--seeds", help="comma-separated seeds (training.seed and the sampler's seed); with --sweep: run "
                                   "only these of its seeds this time")
    p.add_argument("--select", help="metric that picks each column's learning rate, e.g. answers:validation.rougeL")
    p.add_argument("--report", help="evaluation whose metrics head the report, e.g. answers:test")
    p.add_argument("--repeats", type=int, default=None, help="run the plan this many times, interleaved")
    p.add_argument("--base", type=Path, help="run every method as --config BASE method=<name>")
    p.add_argument("--config-dir", type=Path, default=Path("configs"), help="where smollm2_<method>.yaml live")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<sweep name> for a "
                                            "sweep, else outputs/bench)")
    p.add_argument("--no-malloc-env", action="store_true",
                   help=f"do not set {' '.join(f'{k}={v}' for k, v in runs.MALLOC_ENV.items())} in the runs")
    p.add_argument("--timeout", type=float, help="seconds per run before it is killed and counted as failed")
    p.add_argument("--keep-models", action="store_true", help="keep each run's final/ model")
    p.add_argument("--rerun", action="store_true", help="run again even the runs that are already done")
    p.add_argument("--passes", type=int, help="run only the first K learning rates of each column's grid this time "
                                               "(the rest stays planned: a later call without --passes runs it)")
    p.add_argument("--only", help="comma-separated column labels to run this time (the others stay planned)")
    p.add_argument("--max-runs", type=int, help="stop after starting this many runs (a later call continues)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the runs on disk")
    p.add_argument("--dry-run", action="store_true", help="print the plan (done / to run) and exit")
    p.add_argument("overrides", nargs="*",
                   help="section.key=value for every run; method:section.key=value or label:section.key=value "
                        "for those columns only")
    return p


def _numbers(text: str | None, kind: type, flag: str, parser: argparse.ArgumentParser) -> tuple | None:
    if not text:
        return None
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        parser.error(f"{flag} {text!r}: expected comma-separated numbers")


def sweep_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Sweep:
    """The plan: a sweep file with the command line's extra overrides, or one built from the flags."""
    from owlore.methods import REGISTRY

    if args.sweep is not None:
        try:
            sw = load_sweep(args.sweep, REGISTRY)
        except SweepError as e:
            parser.error(str(e))
        return dataclasses.replace(sw, overrides=(*sw.overrides, *args.overrides), repeats=args.repeats or sw.repeats)
    problems = []
    names = list(REGISTRY) if args.methods == "all" else [m.strip() for m in (args.methods or "").split(",")]
    cols = {m: runs.Column(m, m) for m in names if m}
    if [m for m in cols if m not in REGISTRY]:
        problems.append(f"unknown methods {[m for m in cols if m not in REGISTRY]} (known: {', '.join(REGISTRY)})")
    for text in args.variants:
        try:
            label, method, overrides = runs.parse_variant(text)
        except ValueError as e:
            problems.append(str(e))
            continue
        if method not in REGISTRY:
            problems.append(f"--variants {text!r}: unknown method {method!r} (known: {', '.join(REGISTRY)})")
        elif label in cols or label in REGISTRY:
            problems.append(f"--variants {text!r}: label {label!r} is taken; choose another, e.g. {method}_opt")
        cols[label] = runs.Column(label, method, tuple(overrides))
    names = {*cols, *REGISTRY}
    bad = [o for o in args.overrides if "=" not in o or (":" in o.split("=")[0] and o.split(":")[0] not in names)]
    if bad:
        problems.append(f"overrides must be [method:|label:]section.key=value: {bad}")
    if not cols or not args.steps or args.steps < 1 or (args.repeats or 1) < 1:
        problems.append("need --sweep FILE, or at least one column (--methods/--variants), --steps >= 1 and "
                        "--repeats >= 1")
    if args.task is not None and not args.task.is_file():
        problems.append(f"--task {args.task}: no such config overlay")
    if problems:
        parser.error("; ".join(problems))
    return Sweep(name="bench", columns=tuple(cols.values()), steps=args.steps, batch=args.batch, seq=args.seq,
                 task=args.task, learning_rates=_numbers(args.lr, float, "--lr", parser),
                 seeds=_numbers(args.seeds, int, "--seeds", parser), select=args.select, report=args.report,
                 overrides=tuple(args.overrides), repeats=args.repeats or 1)


def commands(sw: Sweep, out: Path, args: argparse.Namespace) -> list[runs.Run]:
    """Every run of the plan with its full ``train.py`` command. In a quality sweep (a ``select`` metric) only the
    first run evaluates the base model (``eval.before``): every run starts from the same weights."""
    config_dir, base = _portable(args.config_dir), _portable(args.base or Path("configs/smollm2.yaml"))
    task = None if sw.task is None else _portable(sw.task)
    planned = runs.plan(sw.columns, out=_portable(out / "runs" if sw.select else out), seeds=sw.seeds,
                        learning_rates=sw.learning_rates, repeats=sw.repeats)
    out_runs = []
    for i, r in enumerate(planned):
        extra = [*(["data.packing=true"] if args.pack else []),
                 *([f"eval.before={'true' if i == 0 else 'false'}"] if sw.select else [])]
        own = runs.column_overrides(r.label, r.column.method, sw.overrides)
        cmd = runs.run_command(r.column.method, steps=sw.steps, batch=sw.batch, seq=sw.seq, output_dir=r.out_dir,
                               config_dir=config_dir, base=base, base_given=args.base is not None, task=task,
                               overrides=[*extra, *runs.run_overrides(r), *own], script="train.py")
        out_runs.append(runs.Run(r.column, r.lr, r.seed, r.repeat, r.out_dir, tuple(cmd), r.grid))
    return out_runs


def _sweep_filters(args: argparse.Namespace, sw: Sweep, parser: argparse.ArgumentParser
                   ) -> tuple[tuple[float, ...] | None, tuple[int, ...] | None]:
    """``--lr`` / ``--seeds`` given with ``--sweep``: the rates and seeds of its plan to run this time."""
    if args.sweep is None:
        return None, None  # without a sweep file they *are* the plan
    lrs = _numbers(args.lr, float, "--lr", parser)
    seeds = _numbers(args.seeds, int, "--seeds", parser)
    if seeds and sw.seeds and set(seeds) - set(sw.seeds):
        parser.error(f"--seeds {args.seeds}: the sweep's seeds are {list(sw.seeds)}")
    grid = {x for c in sw.columns for x in (c.learning_rates or sw.learning_rates or ())}
    if lrs and grid and not all(any(math.isclose(x, g, rel_tol=1e-9) for g in grid) for x in lrs):
        parser.error(f"--lr {args.lr}: not in the sweep's learning-rate grid {sorted(grid)}")
    return lrs, seeds


def _portable(path: Path) -> Path:
    """A path relative to the repository when it lies inside (runs start in the repository), so the commands in
    ``run.json`` match on another clone and a committed sweep resumes there."""
    path = path if path.is_absolute() else REPO / path
    try:
        return path.resolve().relative_to(REPO)
    except ValueError:
        return path


@entry_point
def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    for name in ("sweep", "out", "task", "base", "config_dir"):  # the user's paths, before working in the repository
        value = getattr(args, name)
        if value is not None:
            setattr(args, name, value.resolve())
    os.chdir(REPO)  # runs start here; a sweep file's task path is relative to the repository
    sw = sweep_from_args(parser, args)
    out = (args.out or (Path("benchmarks/results") / sw.name if args.sweep else Path("outputs/bench"))).resolve()
    env = runs.child_env(not args.no_malloc_env)
    malloc = " ".join(f"{k}={env[k]}" for k in runs.MALLOC_ENV if k in env) or "glibc's malloc defaults"
    command = shlex.join(["python", "eval/bench.py", *(argv if argv is not None else sys.argv[1:])])
    settings = {"steps": sw.steps, "batch": sw.batch, "seq": sw.seq, "packed": args.pack, "repeats": sw.repeats,
                "malloc_env": malloc, **({"task": str(sw.task)} if sw.task else {})}
    plan = commands(sw, out, args)
    fingerprints = {r.out_dir: runs.run_fingerprint(r.command, REPO) for r in plan}
    if args.dry_run:
        for r in plan:
            print(f"{'done  ' if runs.done(r.out_dir, r.command, fingerprints[r.out_dir]) else 'to run'}  {r.out_dir}  "
                  f"{shlex.join(r.command[1:])}")
        return 0
    failed, started = 0, 0
    only = set(args.only.split(",")) if args.only else None
    wanted_lrs, wanted_seeds = _sweep_filters(args, sw, parser)
    for i, r in enumerate(plan, 1):
        if args.report_only or (args.passes and r.grid >= args.passes) or (only and r.label not in only) or (
                wanted_lrs and r.lr is not None and not any(math.isclose(r.lr, x, rel_tol=1e-9) for x in wanted_lrs)) or (
                wanted_seeds and r.seed not in wanted_seeds) or (
                not args.rerun and runs.done(r.out_dir, r.command, fingerprints[r.out_dir])):
            continue
        if args.max_runs is not None and started >= args.max_runs:
            break
        started += 1
        logger.info("[%d/%d] %s: %s", i, len(plan), r.out_dir, shlex.join(r.command))
        t0 = time.perf_counter()
        rc, err_tail = runs.run_process(r.command, r.out_dir, cwd=REPO, timeout=args.timeout, env=env,
                                        fingerprint=fingerprints[r.out_dir])
        if rc == 0 and not args.keep_models:
            shutil.rmtree(r.out_dir / "final", ignore_errors=True)
        failed += rc != 0
        level = logging.INFO if rc == 0 else logging.ERROR
        logger.log(level, "[%d/%d] %s %s in %.0f s%s", i, len(plan), r.out_dir,
                   "ok" if rc == 0 else f"FAILED (exit {rc})", time.perf_counter() - t0,
                   "" if rc == 0 else f"; stderr tail:\n{err_tail}")
        write(out, plan, sw, command, settings, fingerprints)  # partial results survive an interrupted benchmark
    rows = write(out, plan, sw, command, settings, fingerprints)
    missing = sum(r["status"] != "ok" for r in rows)
    logger.info("wrote %s and %s (%d runs, %d not ok)", out / "bench.json", out / "bench.md", len(rows), missing)
    print("\n" + (out / "bench.md").read_text())
    return 1 if failed or (missing and not args.report_only) else 0


def write(out: Path, plan: list[runs.Run], sw: Sweep, command: str, settings: dict,
          fingerprints: dict[Path, runs.Fingerprint | None]) -> list[dict]:
    """Rows of every planned run on disk (missing ones as such), the aggregates, the report and the plots."""
    rows = [records.read_row(r, batch=sw.batch, seq=sw.seq, fingerprint=fingerprints[r.out_dir]) for r in plan]
    agg = aggregate.aggregate(rows)
    chosen = aggregate.choose(agg, sw.select, lower_is_better=sw.lower_is_better) if sw.select else None
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "settings": settings, "name": sw.name, "description": sw.description,
            "select": sw.select, "report": sw.report,
            "columns": {c.label: {"method": c.method, "overrides": list(c.overrides),
                                  "learning_rates": c.learning_rates} for c in sw.columns}}
    (out / "bench.json").write_text(json.dumps({**meta, "runs": rows, "aggregate": agg, "chosen": chosen},
                                               indent=1, default=str))
    (out / "bench.md").write_text(report.render_markdown(agg, chosen, meta))
    report.plot_bench(agg, rows, out / "bench.png", title=", ".join(f"{k} {v}" for k, v in settings.items()))
    if chosen and sw.report:
        report.plot_pareto(agg, chosen, sw.report, out / "pareto.png", title=sw.name)
    return rows


if __name__ == "__main__":
    raise SystemExit(exit_code(main()))
