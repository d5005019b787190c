"""Compare training methods on the same model, data, batch and steps: memory, step time, loss, accuracy.

    python eval/compare.py --methods full,lora,qlora,galore,lisa,badam,owlore --steps 60 [--batch 8] [--seq 128]
        [--repeats 3] [--base configs/smollm2.yaml] [--out outputs/compare] [--demo-limit 10]
        [section.key=value ...]           # passed to every run, e.g. model.name=... data.train=...
        [method:section.key=value ...]    # to that method's runs only, e.g. owlore:owlore.gamma=2

Every run is a fresh ``train.py`` process (``configs/smollm2_<method>.yaml``, or ``--base`` with ``method=<name>``
where that file does not exist), logging to ``<out>/<method>[_r<k>]/train.{log,stderr}``. With ``--repeats``
the method list runs interleaved (A B C A B C) and the table gives median (min–max) and ratios to ``full``
taken within each repeat. Writes ``<out>/compare.json`` (every run and the aggregates), ``<out>/compare.md``
and ``<out>/compare.png``. A failed run is reported with its stderr tail and the others go on; the exit code
is 1 if any failed. Each run's ``final/`` model is deleted once read (``--keep-models`` keeps it).
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

from owlore import comparison as cmp

REPO = Path(__file__).resolve().parent.parent
logger = logging.getLogger("compare")
RECORD = cmp.RECORD


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,lora,qlora,galore,lisa,badam,owlore",
                   help="comma-separated methods (owlore/methods registry)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=8, help="per-device train batch size")
    p.add_argument("--seq", type=int, default=128, help="data.max_seq_length")
    p.add_argument("--repeats", type=int, default=1, help="run the method list this many times, interleaved")
    p.add_argument("--base", type=Path,
                   help="run every method as --config BASE method=<name> (default: configs/smollm2_<method>.yaml, "
                        "or configs/smollm2.yaml for a method without one)")
    p.add_argument("--config-dir", type=Path, default=Path("configs"), help="where smollm2_<method>.yaml live")
    p.add_argument("--out", type=Path, default=Path("outputs/compare"))
    p.add_argument("--demo-limit", type=int, help="demo items per task type in the before/after evaluation")
    p.add_argument("--timeout", type=float, help="seconds per run before it is killed and counted as failed")
    p.add_argument("--keep-models", action="store_true", help="keep each run's final/ model")
    p.add_argument("overrides", nargs="*",
                   help="section.key=value passed to every run (after the above); method:section.key=value to "
                        "that method's runs only")
    return p


def run_one(cmd: list[str], out_dir: Path, timeout: float | None) -> tuple[int, str]:
    """Run one training process with its logs in ``out_dir``; the exit code and the stderr tail."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")}
    return cmp.run_process(cmd, out_dir, cwd=REPO, timeout=timeout, env=env, who="compare.py")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    from owlore.methods import REGISTRY

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REGISTRY]
    bad = [o for o in args.overrides if "=" not in o or (":" in o.split("=")[0]
                                                        and o.split(":")[0] not in REGISTRY)]
    if not methods or unknown or bad or args.steps < 1 or args.repeats < 1:
        parser.error(f"unknown methods {unknown} (known: {', '.join(REGISTRY)})" if unknown else
                     f"overrides must be [method:]section.key=value: {bad}" if bad else
                     "need at least one method, --steps >= 1 and --repeats >= 1")
    config_dir = args.config_dir if args.config_dir.is_absolute() else REPO / args.config_dir
    base_given = args.base is not None
    base = args.base or Path("configs/smollm2.yaml")
    base = base if base.is_absolute() else REPO / base
    out = args.out.resolve()
    command = shlex.join(["python", "eval/compare.py", *(argv if argv is not None else sys.argv[1:])])
    settings = {"steps": args.steps, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
                **({"demo_limit": args.demo_limit} if args.demo_limit is not None else {})}

    rows: list[dict] = []
    plan = cmp.schedule(methods, args.repeats)
    for i, (repeat, method) in enumerate(plan, 1):
        run_out = cmp.run_dir(out, method, repeat, args.repeats)
        cmd = cmp.run_command(method, steps=args.steps, batch=args.batch, seq=args.seq, output_dir=run_out,
                              config_dir=config_dir, base=base, base_given=base_given, demo_limit=args.demo_limit,
                              overrides=args.overrides, script=str(REPO / "train.py"))
        logger.info("[%d/%d] %s (repeat %d/%d): %s", i, len(plan), method, repeat + 1, args.repeats,
                    shlex.join(cmd))
        t0 = time.perf_counter()
        rc, err_tail = run_one(cmd, run_out, args.timeout)
        record_path = run_out / RECORD
        row = None
        if rc == 0 and record_path.is_file():
            try:
                row = cmp.parse_record(json.loads(record_path.read_text()), method=method, repeat=repeat,
                                       batch=args.batch, seq=args.seq)
            except (KeyError, TypeError, ValueError) as e:  # a record from an older train.py, a cut-off file
                rc, err_tail = 1, f"unreadable {record_path}: {e!r}\n{err_tail}"
        if row is not None:
            if not args.keep_models:
                shutil.rmtree(run_out / "final", ignore_errors=True)
            step = row["step_median_s"]
            logger.info("[%d/%d] %s ok in %.0f s: median step %s s, peak %.2f GiB (+%.2f above the model), "
                        "final loss %s", i, len(plan), method, time.perf_counter() - t0,
                        f"{step:.3f}" if step is not None else "–", (row["peak_memory_bytes"] or 0) / cmp.GIB,
                        (row["memory_above_load_bytes"] or 0) / cmp.GIB,
                        f"{row['final_loss']:.4f}" if row["final_loss"] is not None else "–")
        else:
            if rc == 0:
                rc, err_tail = 1, f"exit 0 but no {record_path}\n{err_tail}"
            row = cmp.failed_row(method, repeat, rc, err_tail)
            logger.error("[%d/%d] %s FAILED (exit %d) after %.0f s; stderr tail:\n%s", i, len(plan), method, rc,
                         time.perf_counter() - t0, err_tail)
        row["output_dir"] = str(run_out)
        row["command"] = cmd
        rows.append(row)
        _write(out, rows, command, settings)  # partial results survive an interrupted comparison
    failed = [r for r in rows if r["status"] != "ok"]
    logger.info("wrote %s, %s and %s%s", out / "compare.json", out / "compare.md", out / "compare.png",
                f"; {len(failed)} of {len(rows)} runs failed" if failed else "")
    print("\n" + (out / "compare.md").read_text())
    return 1 if failed else 0


def _write(out: Path, rows: list[dict], command: str, settings: dict) -> None:
    agg = cmp.aggregate(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"command": command, "settings": settings, "runs": rows,
                                                  "aggregate": agg}, indent=1, default=str))
    (out / "compare.md").write_text(cmp.render_markdown(agg, command=command, settings=settings))
    cmp.plot_comparison(agg, out / "compare.png", title=", ".join(f"{k} {v}" for k, v in settings.items()))


if __name__ == "__main__":
    sys.exit(main())
