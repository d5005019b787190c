"""owlore/benchmark on synthetic records (plans, commands, resume, rows, aggregates, learning-rate choice, report,
plots), sweep files, the step timer, and eval/bench.py end to end on a tiny checkpoint (failure, resume)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from owlore.benchmark import aggregate, records, report, runs
from owlore.benchmark.sweep import SweepError, load_sweep

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import eval_support as support  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GIB, MIB = 2**30, 2**20


def record(method: str = "full", *, step_seconds=(3.0, 2.0, 1.0, 1.0, 2.0, 4.0), peak=3 * GIB, base=GIB,
           losses=None, kind: str = "rss", tokens=(100, 100, 100, 100, 100, 100), rouge=0.5, before=None,
           ppl=20.0, state=None, history=None) -> dict:
    """An ``owlore_record.json`` as train.py writes it (memory probe on), with only the fields the rows read."""
    losses = list(losses) if losses is not None else [float(10 - i) for i in range(10)]
    n = len(step_seconds)
    state = list(state or [8] * n)
    series = {"step": list(range(1, n + 1)), "optimizer_state": [s * MIB for s in state],
              "svd_seconds": [None] * n}
    after = {"answers:test": {"exact_match": rouge / 2, "f1": rouge, "rougeL": rouge, "n": 10, "average": rouge,
                              "samples": []},
             "answers:validation": {"rougeL": rouge + 0.01, "average": rouge + 0.01},
             "perplexity:general": {"perplexity": ppl, "nll": 3.0, "tokens": 100}}
    rec = {"method": method, "summary": {
        "method": method, "train_loss": 5.5, "optimizer_steps": n, "train_seconds": 20.0, "wall_seconds": 30.0,
        "peak_memory_bytes": peak + GIB, "train_peak_memory_bytes": peak, "train_peak_is_training_only": True,
        "memory_kind": kind, "rss_after_load_bytes": base, "memory_at_train_begin_bytes": base // 2,
        "step_seconds": list(step_seconds), "step_tokens": list(tokens) if tokens is not None else None,
        "log_losses": losses, "optimizer_state_bytes": 8 * MIB, "trainable_parameters": 1000,
        "eval_before": before or {}, "eval_after": after,
        "memory_profile": {"peak": {"weights": 200 * MIB, "gradients": 50 * MIB, "optimizer_state": 8 * MIB,
                                    "activations": 100 * MIB, "logits": 10 * MIB, "total": 358 * MIB},
                           "series": series}}}
    if history is not None:
        rec["history"] = [{"step": s, "layers": [0]} for s in history]
    return rec


def row(label: str, *, repeat: int = 0, seed: int | None = 0, lr: float | None = None, step: float = 1.0,
        above: float = 1.0, **kw) -> dict:
    rec = record(label, step_seconds=(9.0, 9.0, step, step, step), peak=int((1 + above) * GIB), tokens=(10,) * 5,
                 **kw)
    return records.parse_record(rec, label=label, method=label, lr=lr, seed=seed, repeat=repeat, batch=2, seq=8)


# ------------------------------------------------------------------------------------------------ plans
def test_run_command_uses_the_method_config_else_the_base_and_adds_the_task(tmp_path):
    (tmp_path / "smollm2_full.yaml").write_text("include: smollm2.yaml\nmethod: full\n")
    base = tmp_path / "smollm2.yaml"
    kw = dict(steps=7, batch=3, seq=64, config_dir=tmp_path, base=base, python="py", script="train.py")
    full = runs.run_command("full", output_dir=tmp_path / "o", overrides=["model.name=tiny"],
                            task=Path("configs/tasks/manpages.yaml"), **kw)
    assert full[:6] == ["py", "train.py", "--config", str(tmp_path / "smollm2_full.yaml"), "--config",
                        "configs/tasks/manpages.yaml"]
    for arg in ["training.max_steps=7", "training.per_device_train_batch_size=3", "data.max_seq_length=64",
                "training.save_strategy=no", "memory.profile=true",
                "training.include_num_input_tokens_seen=non_padding"]:
        assert arg in full
    assert full[-1] == "model.name=tiny"  # last, so the user's value wins
    lisa = runs.run_command("lisa", output_dir=tmp_path / "l", **kw)
    assert lisa[2:5] == ["--config", str(base), "method=lisa"]


def test_column_overrides_take_the_method_and_the_label_prefix():
    o = ["a.b=1", "owlore:owlore.gamma=2", "opt:memory.chunked_loss=8", "lisa:lisa.gamma=1", "data.train=http://x:1"]
    assert runs.column_overrides("opt", "owlore", o) == ["a.b=1", "owlore.gamma=2", "memory.chunked_loss=8",
                                                         "data.train=http://x:1"]
    assert runs.split_overrides("a.b=1,c.d=[x,y],e=2") == ["a.b=1", "c.d=[x,y]", "e=2"]
    assert runs.parse_variant("opt=owlore:a.b=1,c=[1,2]") == ("opt", "owlore", ["a.b=1", "c=[1,2]"])
    with pytest.raises(ValueError, match="label=method"):
        runs.parse_variant("owlore")


def test_plan_runs_every_column_at_its_first_learning_rate_first(tmp_path):
    cols = [runs.Column("full", "full"), runs.Column("lora", "lora", learning_rates=(1e-3, 3e-3, 1e-2)),
            runs.Column("owl", "owlore", ("owlore.mode=owl",))]
    plan = runs.plan(cols, out=tmp_path, seeds=[0, 1], learning_rates=[3e-4, 1e-4])
    first = [(r.label, r.lr, r.seed) for r in plan[:6]]
    assert first == [("full", 3e-4, 0), ("lora", 1e-3, 0), ("owl", 3e-4, 0), ("full", 3e-4, 1), ("lora", 1e-3, 1),
                     ("owl", 3e-4, 1)]
    assert len(plan) == 2 * 2 + 3 * 2 + 2 * 2 and plan[-1].label == "lora" and plan[-1].lr == 1e-2
    assert plan[0].out_dir == tmp_path / "full" / "lr3e-04_s0" and plan[0].grid == 0 and plan[-1].grid == 2
    assert runs.run_overrides(plan[2]) == ["owlore.mode=owl", "training.learning_rate=0.0003", "training.seed=0",
                                           "owlore.seed=0"]
    single = runs.plan([runs.Column("full", "full")], out=tmp_path, repeats=2)
    assert [r.out_dir.name for r in single] == ["r1", "r2"]
    assert runs.plan([runs.Column("a", "full")], out=tmp_path)[0].out_dir == tmp_path / "a"


def test_done_needs_the_record_and_the_same_command(tmp_path):
    cmd = ["py", "train.py", "--config", "x.yaml", "training.max_steps=3"]
    script = tmp_path / "ok.py"
    script.write_text("import pathlib, sys; pathlib.Path(sys.argv[1], 'owlore_record.json').write_text('{}')\n")
    out = tmp_path / "run"
    assert not runs.done(out, cmd)
    rc, _ = runs.run_process([sys.executable, str(script), str(out)], out, cwd=tmp_path)
    assert rc == 0 and runs.done(out, ["other-python", str(script), str(out)])  # the interpreter may differ
    assert not runs.done(out, [sys.executable, str(script), str(out), "training.max_steps=4"])
    assert runs.read_json(out / runs.RUN_FILE)["returncode"] == 0
    (out / runs.RECORD).write_text("{cut")
    assert runs.read_json(out / runs.RECORD) is None


def test_a_run_with_settings_is_matched_by_them_not_by_its_command_text(tmp_path):
    """A pin that restates a value, or a moved folder, is the same run; a changed value is not."""
    settings = {"method": "owlore", "training": {"learning_rate": 3e-4}, "owlore": {"gamma": 4, "rank": 64}}
    fp = runs.Fingerprint(settings, {"owlore": {"gamma": 4, "rank": 64}}, files="abc")
    out = tmp_path / "moved"
    out.mkdir()
    (out / runs.RECORD).write_text(json.dumps(record()))
    (out / runs.RUN_FILE).write_text(json.dumps({"command": ["train.py", "training.output_dir=old"], "returncode": 0,
                                                 "settings": settings, "files": "abc"}))
    pinned = ("py", "train.py", "training.output_dir=moved", "owlore.gamma=4")
    assert runs.done(out, pinned, fp)
    run = runs.Run(runs.Column("owlore", "owlore"), 3e-4, 0, 0, out, pinned)
    assert records.read_row(run, batch=1, seq=1, fingerprint=fp)["status"] == "ok"
    changed = runs.Fingerprint({**settings, "owlore": {"gamma": 8, "rank": 64}}, fp.defaults, files="abc")
    assert not runs.done(out, pinned, changed)
    assert records.read_row(run, batch=1, seq=1, fingerprint=changed)["status"] == "missing"
    assert not runs.done(out, pinned, runs.Fingerprint(settings, fp.defaults, files="other data"))
    assert not runs.done(out, pinned)  # without a fingerprint only the exact command counts


# ------------------------------------------------------------------------------------------------ rows
def test_parse_record_memory_tokens_quality_and_probe():
    r = records.parse_record(record(tokens=(50, 50, 100, 100, 200, 100), history=[0, 3]), label="owl", batch=4,
                             seq=32, method="owlore", lr=3e-4, seed=1)
    assert (r["label"], r["method"], r["lr"], r["seed"]) == ("owl", "owlore", 3e-4, 1)
    assert r["peak_memory_bytes"] == 3 * GIB and r["memory_above_load_bytes"] == 2 * GIB
    assert r["step_median_s"] == 1.5 and r["step_mean_s"] == 2.0 and r["step_max_over_median"] == 4.0 / 1.5
    assert r["tokens_per_second"] == pytest.approx(500 / 8.0) and r["tokens_per_step"] == 125
    assert r["final_loss"] == 1.0
    assert r["after"]["answers:test.rougeL"] == 0.5 and r["after"]["perplexity:general.perplexity"] == 20.0
    assert "answers:test.samples" not in r["after"] and "answers:test.n" not in r["after"]
    assert r["activations_bytes"] == 100 * MIB and r["live_above_weights_bytes"] == 158 * MIB
    assert r["layer_switching"] and r["switches"] == 2
    est = records.parse_record(record(tokens=None), label="x", batch=4, seq=32)
    assert est["tokens_estimated"] and est["tokens_per_second"] == pytest.approx(4 * 32 * 4 / 8.0)
    assert records.parse_record(record(kind="cuda"), label="x", batch=1, seq=1)["baseline_memory_bytes"] == GIB // 2
    assert records.step_stats([5.0, 4.0, 1.0, 2.0, 3.0, 10.0])["step_median_s"] == 2.5
    assert records.final_loss([]) is None and records.final_loss([3.0, 1.0]) == 1.0


def test_read_row_tells_done_failed_and_missing_apart(tmp_path):
    col = runs.Column("full", "full")
    run = runs.Run(col, 3e-4, 0, 0, tmp_path / "r", ("py", "train.py", "a=1"))
    assert records.read_row(run, batch=1, seq=1)["status"] == "missing"
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / runs.RUN_FILE).write_text(json.dumps({"command": ["train.py", "a=1"], "returncode": 2}))
    (tmp_path / "r" / "train.stderr").write_text("config error: boom\n")
    failed = records.read_row(run, batch=1, seq=1)
    assert failed["status"] == "failed" and "boom" in failed["stderr_tail"] and failed["lr"] == 3e-4
    (tmp_path / "r" / runs.RUN_FILE).write_text(json.dumps({"command": ["train.py", "a=1"], "returncode": 0}))
    (tmp_path / "r" / runs.RECORD).write_text(json.dumps(record()))
    assert records.read_row(run, batch=1, seq=1)["status"] == "ok"
    (tmp_path / "r" / runs.RUN_FILE).write_text(json.dumps({"command": ["train.py", "a=2"], "returncode": 0}))
    assert records.read_row(run, batch=1, seq=1)["status"] == "missing"  # another command: not this run


# ------------------------------------------------------------------------------------------------ aggregate
def test_aggregate_pairs_ratios_within_a_repeat_and_summarises_seeds():
    rows = []
    for rep, (full_s, ow_s) in enumerate([(1.0, 0.3), (2.0, 0.8), (1.5, 0.3)]):  # the host is slow in repeat 1
        rows.append(row("full", repeat=rep, step=full_s, above=2.0))
        rows.append(row("owlore", repeat=rep, step=ow_s, above=0.25 * (rep + 1), rouge=0.4 + 0.1 * rep))
    rows.append(records.failed_row("lora", method="lora", lr=None, seed=0, repeat=0, returncode=1,
                                   stderr_tail="Boom!"))
    agg = aggregate.aggregate(rows)
    ow = agg["owlore"]
    r = ow["ratio"]["step_median_s"]  # 0.3, 0.4, 0.2 per repeat; a ratio of medians would say 0.2
    assert (r["median"], r["min"], r["max"], r["n"]) == pytest.approx((0.3, 0.2, 0.4, 3))
    q = ow["quality"]["answers:test.rougeL"]
    assert q["mean"] == pytest.approx(0.5) and q["std"] == pytest.approx(0.1) and q["n"] == 3
    assert agg["lora"]["ok"] == 0 and agg["lora"]["failed"][0]["stderr_tail"] == "Boom!"
    assert agg["lora"]["metrics"]["step_median_s"] is None


def test_forgetting_is_against_the_base_models_perplexity():
    base = {"perplexity:general": {"perplexity": 16.0}}
    rows = [row("full", rouge=0.6, ppl=20.0, before=base), row("owlore", rouge=0.5, ppl=17.0)]
    agg = aggregate.aggregate(rows)
    assert agg["_base"]["quality"]["perplexity:general.perplexity"]["mean"] == 16.0
    assert agg["full"]["quality"]["forgetting"]["mean"] == pytest.approx(0.25)
    assert agg["owlore"]["quality"]["forgetting"]["mean"] == pytest.approx(17 / 16 - 1)


def test_choose_picks_the_learning_rate_on_validation_not_on_test():
    rows = [row("owl", lr=1e-4, rouge=0.30), row("owl", lr=3e-4, rouge=0.50), row("owl", lr=1e-3, rouge=0.40),
            row("full", lr=3e-4, rouge=0.2)]
    rows[2]["after"]["answers:test.rougeL"] = 0.99  # the best held-out score must not decide
    agg = aggregate.aggregate(rows)
    chosen = aggregate.choose(agg, "answers:validation.rougeL")
    assert chosen["owl"]["lr"] == 3e-4 and chosen["owl"]["key"] == "owl@3e-04"
    assert chosen["owl"]["grid"] == pytest.approx({"1e-04": 0.31, "3e-04": 0.51, "1e-03": 0.41})
    low = aggregate.choose(agg, "perplexity:general.perplexity", lower_is_better=True)
    assert low["owl"]["value"] == 20.0


def test_markdown_and_plots(tmp_path):
    rows = [row("full", lr=3e-4, rouge=0.6, before={"answers:test": {"rougeL": 0.1}}),
            row("owl", lr=1e-4, rouge=0.4, above=0.4), row("owl", lr=3e-4, rouge=0.5, above=0.4),
            records.failed_row("lora", method="lora", lr=1e-3, seed=0, repeat=0, returncode=1, stderr_tail="Boom!"),
            records.failed_row("lora", method="lora", lr=3e-3, seed=0, repeat=0, returncode=None, stderr_tail="",
                               status="missing")]
    agg = aggregate.aggregate(rows)
    chosen = aggregate.choose(agg, "answers:validation.rougeL")
    meta = {"command": "python eval/bench.py --sweep s.yaml", "settings": {"steps": 5}, "name": "s",
            "select": "answers:validation.rougeL", "report": "answers:test"}
    md = report.render_markdown(agg, chosen, meta)
    assert "python eval/bench.py --sweep s.yaml" in md and "3 of 5 runs done" in md
    owl = next(ln for ln in md.splitlines() if ln.startswith("| owl | owl |")).split(" | ")
    assert owl[2] == "3e-04" and owl[3:6] == ["0.250", "0.500", "0.500"]  # EM, F1, ROUGE-L at the chosen lr
    assert "| owl | 0.410 | **0.510** |" in md  # the grid, chosen in bold
    assert "## lora@1e-03 failed" in md and "Boom!" in md
    png = report.plot_bench(agg, rows, tmp_path / "bench.png")
    pareto = report.plot_pareto(agg, chosen, "answers:test", tmp_path / "pareto.png")
    for p in (png, pareto):
        support.assert_plot(p)


# ------------------------------------------------------------------------------------------------ sweep files
def test_sweep_files_are_checked_all_at_once(tmp_path):
    good = tmp_path / "s.yaml"
    good.write_text("name: s\nsteps: 5\nbatch: 2\nseq: 32\nlearning_rates: [3.0e-4]\nseeds: [0, 1]\n"
                    "select: perplexity:validation.perplexity\ncolumns:\n  owl: {method: owlore}\n"
                    "  lora64: {method: lora, overrides: [lora.r=64], learning_rates: [1.0e-3]}\n")
    sw = load_sweep(good, {"owlore": 1, "lora": 1})
    assert [c.label for c in sw.columns] == ["owl", "lora64"] and sw.columns[1].overrides == ("lora.r=64",)
    assert sw.seeds == (0, 1) and sw.lower_is_better
    bad = tmp_path / "b.yaml"
    bad.write_text("steps: 0\nbatch: 2\nseq: x\nlearning_rates: [-1]\ntask: nope.yaml\nfoo: 1\n"
                   "columns:\n  a/b: {method: nosuch, extra: 1}\n")
    with pytest.raises(SweepError) as e:
        load_sweep(bad, {"owlore": 1})
    for text in ("steps=0", "seq='x'", "learning_rates=[-1]", "task='nope.yaml'", "foo: unknown key",
                 "columns.a/b: a label names a folder", "unknown keys ['extra']", "method='nosuch'"):
        assert text in str(e.value)


def test_the_shipped_sweeps_load():
    from owlore.methods import REGISTRY

    files = sorted((ROOT / "benchmarks" / "sweeps").glob("*.yaml"))
    assert files
    for f in files:
        sw = load_sweep(f, REGISTRY)
        assert sw.select and "validation" in sw.select and sw.report and "test" in sw.report  # never tuned on test


# ------------------------------------------------------------------------------------------------ metrics
def test_step_timer_times_steps_and_counts_tokens(tiny_llama):
    from owlore.run.metrics import StepTimer, rss_after_touch

    assert rss_after_touch(tiny_llama) > 0
    timer = StepTimer()
    args = SimpleNamespace(include_num_input_tokens_seen="non_padding")
    state = SimpleNamespace(num_input_tokens_seen=0)
    timer.on_train_begin(args, state, None)
    for n in (30, 12):
        timer.on_step_begin(args, state, None)
        state.num_input_tokens_seen += n
        timer.on_step_end(args, state, None)
    timer.on_step_end(args, state, None)  # an end without a begin is not a step
    timer.on_train_end(args, state, None)
    s = timer.summary()
    assert len(s["step_seconds"]) == 2 and s["step_tokens"] == [30, 12] and s["memory_kind"] == "rss"


def test_step_timer_on_cuda_records_events_and_syncs_once_when_read(monkeypatch):
    """No GPU needed: CUDA is faked, and any per-step synchronize fails the test."""
    import owlore.run.metrics as metrics

    waits: list[int] = []

    class FakeEvent:
        clock = 0.0

        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing
            self.t = None

        def record(self) -> None:
            FakeEvent.clock += 0.25
            self.t = FakeEvent.clock

        def synchronize(self) -> None:
            waits.append(1)

        def elapsed_time(self, end: FakeEvent) -> float:
            return 1e3 * (end.t - self.t)  # milliseconds, as torch.cuda.Event reports

    monkeypatch.setattr(metrics, "memory_kind", lambda: "cuda")
    monkeypatch.setattr(metrics.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(metrics.torch.cuda, "synchronize", lambda *a: pytest.fail("a host sync per step"))
    timer = metrics.StepTimer()
    args = SimpleNamespace(include_num_input_tokens_seen="no")
    state = SimpleNamespace(num_input_tokens_seen=0)
    for _ in range(3):
        timer.on_step_begin(args, state, None)
        timer.on_step_end(args, state, None)
    assert waits == []  # nothing waited while training
    assert timer.seconds == pytest.approx([0.25, 0.25, 0.25]) and waits == [1]
    assert timer.seconds == pytest.approx([0.25] * 3) and waits == [1]  # read once


# ------------------------------------------------------------------------------------------------ the script
def test_script_rejects_bad_columns_and_overrides(tmp_path):
    script = support.load_script("bench")
    for argv in (["--methods", "full,nosuch", "--steps", "1"], ["--methods", "full", "--steps", "1", "no:a.b=1"],
                 ["--methods", "full"], ["--variants", "bad"]):
        with pytest.raises(SystemExit):
            script.main(["--out", str(tmp_path / "x"), *argv])


def test_bench_end_to_end_on_a_tiny_checkpoint_with_a_failure_and_resume(tmp_path):
    ckpt = support.save_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i}?", "output": str(2 * i)}) + "\n"
                            for i in range(8)))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i}?", "output": str(2 * i)}) + "\n"
                           for i in range(8, 11)))
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"The number {i} is followed by {i + 1}."}) + "\n" for i in range(6)))
    out = tmp_path / "bench"
    argv = [sys.executable, "eval/bench.py", "--methods", "full", "--variants", "lisa1=lisa:lisa.gamma=1,lisa.interval=1",
            "--variants", "broken=full:lora.r=8", "--steps", "2", "--batch", "2", "--seq", "128",
            "--lr", "1e-3", "--select", "answers:validation.rougeL", "--report", "answers:validation", "--out", str(out), f"model.name={ckpt}",
            f"data.train={data}", "eval.demo=false", f"eval.answers={{validation: {val}}}",
            f"eval.perplexity={{general: {text}}}", "eval.max_new_tokens=4"]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # one column failed, the others went on
    result = json.loads((out / "bench.json").read_text())
    assert [(x["label"], x["status"]) for x in result["runs"]] == [("full", "ok"), ("lisa1", "ok"),
                                                                  ("broken", "failed")]
    full, lisa, _ = result["runs"]
    assert lisa["layer_switching"] and lisa["gradients_bytes"] < full["gradients_bytes"]
    assert "answers:validation.rougeL" in full["after"] and "perplexity:general.perplexity" in full["before"]
    assert lisa["before"] == {}  # only the first run measures the base model
    assert set(result["chosen"]) == {"full", "lisa1"}
    md = (out / "bench.md").read_text()
    assert "## broken@1e-03 failed" in md and (out / "pareto.png").stat().st_size > 5000
    stamp = (out / "runs" / "full" / "lr1e-03" / runs.RECORD).stat().st_mtime_ns
    again = subprocess.run([*argv, "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.stdout.count("done ") == 2 and again.stdout.count("to run") == 1
    rerun = subprocess.run([*argv, "--report-only"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert (out / "runs" / "full" / "lr1e-03" / runs.RECORD).stat().st_mtime_ns == stamp  # nothing re-ran


def test_lr_and_seeds_with_a_sweep_run_only_those_runs_of_its_plan(tmp_path, monkeypatch):
    script = support.load_script("bench")
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nsteps: 2\nbatch: 2\nseq: 32\nlearning_rates: [1.0e-3, 1.0e-4]\nseeds: [0, 1]\n"
                     "select: answers:validation.rougeL\nreport: answers:test\ncolumns:\n  a: {method: full}\n"
                     "  b: {method: lisa}\n")
    started: list[Path] = []
    monkeypatch.setattr(script.runs, "run_process", lambda cmd, out_dir, **kw: started.append(out_dir) or (1, ""))
    rc = script.main(["--sweep", str(sweep), "--out", str(tmp_path / "o"), "--lr", "1e-4", "--seeds", "1"])
    assert rc == 1  # the stub runs "failed"; what matters is which ran
    assert sorted((p.parent.name, p.name) for p in started) == [("a", "lr1e-04_s1"), ("b", "lr1e-04_s1")]
    report = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert len(report["runs"]) == 8  # the report still covers the whole plan; the rest stays planned
    for bad in (["--lr", "5e-2"], ["--seeds", "7"]):
        with pytest.raises(SystemExit):
            script.main(["--sweep", str(sweep), "--out", str(tmp_path / "o"), *bad])
