"""owlore/comparison.py on synthetic records (commands, rows, medians, within-repeat ratios, report, plot),
the step timer, eval/compare.py's failure handling, and one end-to-end comparison on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from owlore import comparison as cmp

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import eval_support as support  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def record(method: str = "full", *, step_seconds=(3.0, 2.0, 1.0, 1.0, 2.0, 4.0), peak=3 * GIB, base=GIB,
           losses=None, kind: str = "rss", tokens=(100, 100, 100, 100, 100, 100), before=0.4, after=0.6) -> dict:
    """An ``owlore_record.json`` as train.py writes it, with only the fields the comparison reads."""
    losses = list(losses) if losses is not None else [float(10 - i) for i in range(10)]
    return {"method": method, "summary": {
        "method": method, "train_loss": 5.5, "optimizer_steps": len(step_seconds), "train_seconds": 20.0,
        "wall_seconds": 30.0, "peak_memory_bytes": peak + GIB, "train_peak_memory_bytes": peak,
        "train_peak_is_training_only": True, "memory_kind": kind, "rss_after_load_bytes": base,
        "memory_at_train_begin_bytes": base // 2, "step_seconds": list(step_seconds),
        "step_tokens": list(tokens) if tokens is not None else None, "log_losses": losses,
        "optimizer_state_bytes": 8 * 2**20, "trainable_parameters": 1000,
        "eval_before": {"demo": {"average": before}} if before is not None else {},
        "eval_after": {"demo": {"average": after}} if after is not None else {}}}


def row(method: str, repeat: int, step: float, above: float, **kw) -> dict:
    """A parsed row whose median step is ``step`` s and memory above the model ``above`` GiB."""
    r = cmp.parse_record(record(method, step_seconds=(9.0, 9.0, step, step, step), peak=int((1 + above) * GIB),
                                tokens=(10,) * 5, **kw), method=method, repeat=repeat, batch=2, seq=8)
    return r


# ------------------------------------------------------------------------------------------------ commands
def test_run_command_uses_the_method_config_else_the_base(tmp_path):
    (tmp_path / "smollm2_full.yaml").write_text("include: smollm2.yaml\nmethod: full\n")
    base = tmp_path / "smollm2.yaml"
    kw = dict(steps=7, batch=3, seq=64, config_dir=tmp_path, base=base, python="py", script="train.py")
    full = cmp.run_command("full", output_dir=tmp_path / "o" / "full", demo_limit=2,
                           overrides=["model.name=tiny", "training.logging_steps=5"], **kw)
    assert full[:4] == ["py", "train.py", "--config", str(tmp_path / "smollm2_full.yaml")]
    for arg in ["training.max_steps=7", "training.per_device_train_batch_size=3", "data.max_seq_length=64",
                f"training.output_dir={tmp_path / 'o' / 'full'}", "training.save_strategy=no",
                "training.report_to=none", "eval.demo=true", "eval.demo_limit=2"]:
        assert arg in full
    assert full[-2:] == ["model.name=tiny", "training.logging_steps=5"]  # last, so the user's value wins
    lisa = cmp.run_command("lisa", output_dir=tmp_path / "lisa",
                           overrides=["lisa:lisa.gamma=2", "owlore:owlore.gamma=3", "data.train=http://x:1/d"], **kw)
    assert lisa[2:5] == ["--config", str(base), "method=lisa"]
    assert not any(a.startswith("eval.demo_limit") for a in lisa)
    assert lisa[-2:] == ["lisa.gamma=2", "data.train=http://x:1/d"]  # a method: prefix, or a ':' in a value
    # an explicit --base is used for every method, even one that has its own smollm2_<method>.yaml
    given = cmp.run_command("full", output_dir=tmp_path / "g", base_given=True, **kw)
    assert given[2:5] == ["--config", str(base), "method=full"]


def test_schedule_interleaves_repeats_and_names_run_dirs(tmp_path):
    assert cmp.schedule(["a", "b", "c"], 2) == [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (1, "c")]
    assert cmp.run_dir(tmp_path, "lora", 0, 1) == tmp_path / "lora"
    assert cmp.run_dir(tmp_path, "lora", 1, 3) == tmp_path / "lora_r2"


# ------------------------------------------------------------------------------------------------ one run
def test_step_stats_skip_warmup_and_keep_switches_in_the_mean():
    s = cmp.step_stats([5.0, 4.0, 1.0, 2.0, 3.0, 10.0])  # 10 s: a layer switch
    assert s == {"step_median_s": 2.5, "step_mean_s": 4.0, "timed_steps": 4, "warmup_skipped": 2}
    assert cmp.step_stats([3.0, 1.0]) == {"step_median_s": 2.0, "step_mean_s": 2.0, "timed_steps": 2,
                                          "warmup_skipped": 0}
    assert cmp.step_stats([])["step_median_s"] is None


def test_final_loss_is_the_mean_of_the_last_tenth():
    assert cmp.final_loss([float(i) for i in range(20)]) == pytest.approx(18.5)  # last 2 of 20
    assert cmp.final_loss([float(i) for i in range(21)]) == pytest.approx(19.0)  # ceil(2.1) = 3: 18, 19, 20
    assert cmp.final_loss([4.0, 3.0]) == 3.0
    assert cmp.final_loss([]) is None


def test_parse_record_memory_tokens_and_accuracy():
    r = cmp.parse_record(record(tokens=(50, 50, 100, 100, 200, 100)), method="full", repeat=0, batch=4, seq=32)
    assert r["peak_memory_bytes"] == 3 * GIB and r["memory_above_load_bytes"] == 2 * GIB  # training peak - post-load
    assert r["process_peak_memory_bytes"] == 4 * GIB
    assert r["step_median_s"] == 1.5 and r["step_mean_s"] == 2.0
    assert r["tokens_per_second"] == pytest.approx(500 / 8.0) and not r["tokens_estimated"]
    assert r["final_loss"] == 1.0 and r["train_loss"] == 5.5
    assert (r["demo_before"], r["demo_after"]) == (0.4, 0.6)
    est = cmp.parse_record(record(tokens=None, before=None, after=None), method="x", repeat=0, batch=4, seq=32)
    assert est["tokens_estimated"] and est["tokens_per_second"] == pytest.approx(4 * 32 * 4 / 8.0)
    assert est["demo_before"] is None and est["demo_after"] is None
    cuda = cmp.parse_record(record(kind="cuda"), method="x", repeat=0, batch=1, seq=1)
    assert cuda["baseline_memory_bytes"] == GIB // 2  # on CUDA: allocated at train begin (weights on device)


# ------------------------------------------------------------------------------------------------ aggregate
def synthetic_rows() -> list[dict]:
    """3 repeats; the host is twice as slow in repeat 1. lora failed in repeat 2."""
    rows = []
    for rep, (full_s, lora_s, ow_s) in enumerate([(1.0, 0.5, 0.3), (2.0, 1.2, 0.8), (1.5, None, 0.3)]):
        rows.append(row("full", rep, full_s, above=2.0))
        rows.append(row("lora", rep, lora_s, above=0.5) if lora_s else cmp.failed_row("lora", rep, 1, "Boom!"))
        rows.append(row("owlore", rep, ow_s, above=0.25 * (rep + 1)))
    return rows


def test_aggregate_medians_spreads_and_ratios_within_a_repeat():
    agg = cmp.aggregate(synthetic_rows())
    assert list(agg) == ["full", "lora", "owlore"]
    full, lora, ow = agg["full"], agg["lora"], agg["owlore"]
    assert full["metrics"]["step_median_s"] == {"median": 1.5, "min": 1.0, "max": 2.0, "n": 3}
    assert full["ratio"]["step_median_s"] == {"median": 1.0, "min": 1.0, "max": 1.0, "n": 3}
    # owlore / full per repeat: 0.3, 0.4, 0.2 -> median 0.3 (a ratio of medians would say 0.3 / 1.5 = 0.2)
    r = ow["ratio"]["step_median_s"]
    assert (r["median"], r["min"], r["max"], r["n"]) == pytest.approx((0.3, 0.2, 0.4, 3))
    m = ow["metrics"]["memory_above_load_bytes"]
    assert (m["median"], m["min"], m["max"]) == pytest.approx((0.5 * GIB, 0.25 * GIB, 0.75 * GIB), rel=1e-6)
    assert ow["ratio"]["memory_above_load_bytes"]["median"] == pytest.approx(0.25, rel=1e-6)
    # the failed repeat is left out of lora's medians and ratios, and listed
    assert (lora["runs"], lora["ok"]) == (3, 2)
    assert lora["failed"] == [{"repeat": 2, "returncode": 1, "stderr_tail": "Boom!"}]
    assert lora["metrics"]["step_median_s"]["median"] == pytest.approx(0.85)
    assert lora["ratio"]["step_median_s"]["median"] == pytest.approx((0.5 + 0.6) / 2)
    assert lora["ratio"]["step_median_s"]["n"] == 2


def test_aggregate_without_the_reference_gives_no_ratios():
    agg = cmp.aggregate([row("lora", 0, 1.0, 0.5), cmp.failed_row("full", 0, 2, "config error")])
    assert agg["lora"]["ratio"]["step_median_s"] is None
    assert agg["full"]["metrics"]["step_median_s"] is None and agg["full"]["ok"] == 0


def test_markdown_has_the_command_numbers_and_failures():
    agg = cmp.aggregate(synthetic_rows())
    md = cmp.render_markdown(agg, command="python eval/compare.py --steps 5", settings={"steps": 5, "repeats": 3})
    assert md.splitlines()[3] == "python eval/compare.py --steps 5"
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "peak RSS (GiB)" in lines["method"] and "peak − post-load (GiB)" in lines["method"]
    ow = lines["owlore"].split(" | ")
    assert ow[3] == "0.500 (0.250–0.750)"  # peak - post-load, GiB
    assert ow[4] == "0.25 (0.12–0.38)×"  # x full, per repeat: 0.125, 0.25, 0.375
    assert ow[6] == "0.300 (0.300–0.800)" and ow[7] == "0.30 (0.20–0.40)×"
    assert ow[11].rstrip(" |") == "0.400 (0.400–0.400) → 0.600 (0.600–0.600)"
    assert lines["full"].split(" | ")[1] == "1,000"
    assert lines["lora (2/3 ok)"].split(" | ")[7] == "0.55 (0.50–0.60)×"
    assert "## lora failed (repeat 3, exit 1)" in md and "Boom!" in md
    one = cmp.render_markdown(cmp.aggregate([row("full", 0, 1.0, 2.0), cmp.failed_row("qlora", 0, 1, "x")]),
                              command="c", settings={"repeats": 1})
    assert "| full | 1,000 | 3.000 | 2.000 | 1.00× |" in one  # one repeat: no spreads
    assert "| qlora | failed (exit 1, see below) |" in one


def test_plot_writes_a_png_even_with_a_failed_method(tmp_path):
    agg = cmp.aggregate(synthetic_rows() + [cmp.failed_row("qlora", 0, 1, "x")])
    path = cmp.plot_comparison(agg, tmp_path / "sub" / "compare.png", title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_tail_keeps_the_last_lines():
    assert cmp.tail("\n".join(map(str, range(100))), lines=3) == "97\n98\n99"


# ------------------------------------------------------------------------------------------------ metrics
def test_step_timer_times_steps_and_counts_tokens(tiny_llama):
    from owlore.metrics import StepTimer, rss_after_touch

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
    assert len(s["step_seconds"]) == 2 and all(t >= 0 for t in s["step_seconds"])
    assert s["step_tokens"] == [30, 12] and s["memory_kind"] == "rss"
    assert s["train_peak_memory_bytes"] > 0 and s["memory_at_train_begin_bytes"] > 0
    no_tokens = StepTimer()
    no_tokens.on_step_begin(SimpleNamespace(include_num_input_tokens_seen="no"), state, None)
    no_tokens.on_step_end(SimpleNamespace(include_num_input_tokens_seen="no"), state, None)
    assert no_tokens.summary()["step_tokens"] is None


# ------------------------------------------------------------------------------------------------ the script
def test_script_reports_a_failed_run_and_goes_on(tmp_path, monkeypatch, capsys):
    compare = support.load_script("compare")
    calls = []

    def fake_run_one(cmd, out_dir, timeout):
        calls.append(cmd)
        out_dir.mkdir(parents=True)
        if "lora" in out_dir.name:
            return 1, "Traceback ...\nRuntimeError: lora broke"
        (out_dir / "owlore_record.json").write_text(json.dumps(record(out_dir.name)))
        (out_dir / "final").mkdir()
        return 0, ""

    monkeypatch.setattr(compare, "run_one", fake_run_one)
    out = tmp_path / "cmp"
    rc = compare.main(["--methods", "full,lora,owlore", "--steps", "3", "--out", str(out), "model.name=x",
                       "owlore:owlore.gamma=2"])
    assert rc == 1 and len(calls) == 3 and [c[-1] for c in calls] == ["model.name=x"] * 2 + ["owlore.gamma=2"]
    md = (out / "compare.md").read_text()
    assert "| lora | failed (exit 1, see below) |" in md and "RuntimeError: lora broke" in md
    assert "| owlore | 1,000 |" in md
    data = json.loads((out / "compare.json").read_text())
    assert [r["status"] for r in data["runs"]] == ["ok", "failed", "ok"]
    assert not (out / "full" / "final").exists()  # models are deleted unless --keep-models
    assert (out / "compare.png").is_file()
    with pytest.raises(SystemExit):
        compare.main(["--methods", "full,nosuch", "--steps", "3", "--out", str(out)])
    assert "unknown methods ['nosuch']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--methods", "full", "--steps", "3", "--out", str(out), "nosuch:a.b=1"])
    assert "[method:]section.key=value: ['nosuch:a.b=1']" in capsys.readouterr().err


def test_compare_end_to_end_on_a_tiny_checkpoint(tmp_path):
    ckpt = support.save_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i}?", "output": str(2 * i)}) + "\n"
                            for i in range(8)))
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "eval/compare.py", "--methods", "full,lora", "--steps", "2", "--batch", "2",
                        "--seq", "128", "--demo-limit", "1", "--out", str(out), f"model.name={ckpt}",
                        f"data.train={data}"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "compare.json").read_text())
    assert [(x["method"], x["status"]) for x in result["runs"]] == [("full", "ok"), ("lora", "ok")]
    assert set(result["aggregate"]) == {"full", "lora"}
    md = (out / "compare.md").read_text()
    assert "| full | " in md and "| lora | " in md and "eval/compare.py --methods full,lora" in md
    assert (out / "compare.png").stat().st_size > 5000
    for method in ("full", "lora"):
        summary = json.loads((out / method / "owlore_record.json").read_text())["summary"]
        assert len(summary["step_seconds"]) == 2 and summary["step_tokens"] and len(summary["log_losses"]) == 2
        assert 0 < summary["rss_after_load_bytes"] <= summary["peak_memory_bytes"]
        assert summary["eval_after"]["demo"]["average"] is not None
    trainable = {x["method"]: x["trainable_parameters"] for x in result["runs"]}
    assert trainable["lora"] < trainable["full"]
