"""owlore/bench.py on synthetic records (variants, probe fields, SVD per switch, aggregates, report, plot),
eval/bench.py's column commands and child environment, and one end-to-end benchmark on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from owlore import bench
from owlore import comparison as cmp

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import eval_support as support  # noqa: E402

from tests.test_compare import record as compare_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def record(method: str = "full", *, state=(8, 8, 8, 8, 8, 8), svd=None, history=None, act=100, grads=50,
           **kw) -> dict:
    """A train.py record of a ``memory.profile=true`` run: the comparison fields plus the probe's (MiB)."""
    rec = compare_record(method, **kw)
    n = len(state)
    series = {"step": list(range(1, n + 1)), "weights": [200 * MIB] * n, "gradients": [grads * MIB] * n,
              "optimizer_state": [s * MIB for s in state], "activations": [act * MIB] * n,
              "logits": [10 * MIB] * n, "activations_and_gradients": [max(act, grads) * MIB] * n,
              "svd_seconds": list(svd) if svd is not None else [None] * n, "memory_bytes": [0] * n}
    series["total"] = [200 * MIB + s + b for s, b in zip(series["optimizer_state"],
                                                          series["activations_and_gradients"], strict=True)]
    i = max(range(n), key=series["total"].__getitem__)
    rec["summary"]["memory_profile"] = {"peak": {k: v[i] for k, v in series.items()}, "series": series,
                                        "gradients_source": "hooks"}
    if history is not None:
        rec["history"] = [{"step": s, "layers": [0]} for s in history]
    return rec


def row(label: str, repeat: int, *, method: str | None = None, step: float = 1.0, **kw) -> dict:
    rec = record(label, step_seconds=(9.0, 9.0, step, step, 3 * step), tokens=(10,) * 5, **kw)
    return bench.parse_bench_record(rec, label=label, method=method or label, repeat=repeat, batch=2, seq=8)


# ------------------------------------------------------------------------------------------------ columns
def test_variants_and_their_overrides():
    assert bench.split_overrides("a.b=1,c.d=[x,y],e=2") == ["a.b=1", "c.d=[x,y]", "e=2"]
    assert bench.parse_variant("owlore_opt=owlore:memory.chunked_loss=1024,training.max_grad_norm=0") == (
        "owlore_opt", "owlore", ["memory.chunked_loss=1024", "training.max_grad_norm=0"])
    assert bench.parse_variant("owlore+ckpt=owlore") == ("owlore+ckpt", "owlore", [])
    for bad in ("owlore", "=owlore", "a:b=owlore", "x="):
        with pytest.raises(ValueError, match="label=method"):
            bench.parse_variant(bad)


def test_column_overrides_take_the_method_and_the_label_prefix():
    ovr = ["model.name=m", "owlore:owlore.gamma=2", "opt:memory.chunked_loss=64", "lisa:lisa.gamma=1",
           "data.train=http://h:1/d"]
    assert cmp.column_overrides("opt", "owlore", ovr) == ["model.name=m", "owlore.gamma=2", "memory.chunked_loss=64",
                                                          "data.train=http://h:1/d"]
    assert cmp.column_overrides("owlore", "owlore", ovr) == cmp.method_overrides("owlore", ovr)
    assert cmp.method_overrides("lisa", ovr) == ["model.name=m", "lisa.gamma=1", "data.train=http://h:1/d"]


# ------------------------------------------------------------------------------------------------ one run
def test_probe_fields_kinds_bursts_and_svd_per_switch():
    # a switch at steps 0 and 3 (on_step_begin) is timed in the steps logged as 1 and 4
    rec = record("owlore", svd=(2.0, 0.0, 0.0, 1.0, 0.0, 0.0), history=[0, 3], state=(4, 4, 4, 6, 6, 6),
                 step_seconds=(5.0, 1.0, 1.0, 4.0, 1.0, 1.0))
    f = bench.probe_fields(rec)
    assert f["weights_bytes"] == 200 * MIB and f["gradients_bytes"] == 50 * MIB
    assert f["activations_bytes"] == 100 * MIB and f["logits_bytes"] == 10 * MIB
    assert f["optimizer_state_peak_bytes"] == 6 * MIB and f["live_above_weights_bytes"] == 106 * MIB
    assert f["optimizer_state_series"] == {"step": [1, 2, 3, 4, 5, 6], "bytes": [s * MIB for s in (4, 4, 4, 6, 6, 6)]}
    assert f["optimizer_state_max_bytes"] == 6 * MIB
    assert (f["svd_seconds_total"], f["svd_seconds_per_event"]) == (3.0, 1.5)
    assert f["layer_switching"] and f["switches"] == 2
    assert f["step_max_s"] == 4.0 and f["step_max_over_median"] == 4.0  # after the 2 warm-up steps
    # no switches (galore): an event is a projection refresh, a step with SVD time
    galore = bench.probe_fields(record("galore", svd=(3.0, 0.0, 0.0, 1.0, 0.0, 0.0)))
    assert (galore["svd_seconds_total"], galore["svd_seconds_per_event"]) == (4.0, 2.0)
    assert not galore["layer_switching"]
    full = bench.probe_fields(record())
    assert full["svd_seconds_total"] is None and full["svd_seconds_per_event"] is None
    bare = bench.probe_fields(compare_record())  # a run without the probe: no kinds, no crash
    assert bare["weights_bytes"] is None and bare["live_above_weights_bytes"] is None


def test_parse_bench_record_keeps_the_comparison_row_under_the_label():
    r = row("owlore_opt", 0, method="owlore")
    assert r["method"] == "owlore_opt" and r["base_method"] == "owlore" and r["status"] == "ok"
    assert r["memory_above_load_bytes"] == 2 * 2**30 and r["step_median_s"] == 1.0  # comparison.parse_record
    assert r["step_max_over_median"] == 3.0


# ------------------------------------------------------------------------------------------------ aggregate
def synthetic_rows() -> list[dict]:
    rows = []
    for rep, host in enumerate((1.0, 2.0)):  # the host is twice as slow in repeat 2
        rows.append(row("full", rep, step=host, act=100, grads=500, state=(1000,) * 6))
        rows.append(row("owlore", rep, step=0.5 * host, act=40, grads=50, state=(20, 20, 20, 30, 30, 30),
                        history=[0, 3], svd=(1.0, 0, 0, 0.5, 0, 0)))
        rows.append(row("owlore_opt", rep, method="owlore", step=0.6 * host, act=10, grads=5, state=(20,) * 6)
                    if rep == 0 else cmp.failed_row("owlore_opt", rep, 1, "Boom!"))
    return rows


def test_aggregate_gives_kinds_with_ratios_within_a_repeat():
    agg = bench.aggregate(synthetic_rows())
    assert list(agg) == ["full", "owlore", "owlore_opt"]
    ow = agg["owlore"]
    assert ow["metrics"]["optimizer_state_peak_bytes"]["median"] == 30 * MIB
    assert ow["ratio"]["step_median_s"] == {"median": 0.5, "min": 0.5, "max": 0.5, "n": 2}
    assert ow["ratio"]["gradients_bytes"]["median"] == pytest.approx(0.1)
    assert ow["metrics"]["svd_seconds_per_event"]["median"] == 0.75
    assert agg["owlore_opt"]["ok"] == 1 and agg["owlore_opt"]["failed"][0]["stderr_tail"] == "Boom!"


def test_markdown_has_kinds_bursts_and_failures():
    agg = bench.aggregate(synthetic_rows())
    md = bench.render_markdown(agg, command="python eval/bench.py --steps 6",
                               settings={"steps": 6, "repeats": 2, "malloc_env": "MALLOC_MMAP_THRESHOLD_=65536"})
    assert "python eval/bench.py --steps 6" in md and "MALLOC_MMAP_THRESHOLD_=65536" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = {ln.split(" | ")[0].lstrip("| "): [c.strip() for c in ln.strip("|").split("|")] for ln in table[1:]}
    ow = dict(zip(header, cells["owlore"], strict=True))
    assert ow["opt. state (MiB)"] == "30.0 (30.0–30.0)" and ow["grads (MiB)"] == "50.0 (50.0–50.0)"
    assert ow["activations (MiB)"] == "40.0 (40.0–40.0)" and ow["of which logits (MiB)"] == "10.0 (10.0–10.0)"
    assert ow["max / median step"] == "3.00 (3.00–3.00)" and ow["SVD s / switch"] == "0.750 (0.750–0.750)"
    assert header.count("× full") == 3 and "demo acc before → after" in header  # the synthetic runs have demo
    assert "owlore_opt (1/2 ok)" in cells
    assert "## owlore_opt failed (repeat 2, exit 1)" in md and "Boom!" in md


def test_plot_bench_writes_a_png_even_with_a_failed_column(tmp_path):
    rows = synthetic_rows() + [cmp.failed_row("qlora", 0, 1, "x")]
    path = bench.plot_bench(bench.aggregate(rows), rows, tmp_path / "sub" / "bench.png", title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ------------------------------------------------------------------------------------------------ the script
def test_script_commands_per_column_and_the_child_environment(tmp_path, monkeypatch, capsys):
    script = support.load_script("bench")
    calls = []

    def fake_run_one(cmd, out_dir, timeout, env):
        calls.append((cmd, env))
        out_dir.mkdir(parents=True)
        (out_dir / "owlore_record.json").write_text(json.dumps(record(out_dir.name)))
        return 0, ""

    monkeypatch.setattr(script, "run_one", fake_run_one)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    out = tmp_path / "b"
    rc = script.main(["--methods", "full,owlore", "--variants", "opt=owlore:memory.chunked_loss=64,eval.limit=2",
                      "--steps", "3", "--out", str(out), "model.name=x", "owlore:owlore.gamma=2",
                      "opt:training.max_grad_norm=0"])
    assert rc == 0 and len(calls) == 3
    (full, env), (ow, _), (opt, _) = calls
    assert "memory.profile=true" in full and full.index("eval.demo=false") > full.index("eval.demo=true")
    assert full[-1] == "model.name=x" and ow[-2:] == ["model.name=x", "owlore.gamma=2"]
    assert opt[3].endswith("smollm2_owlore.yaml") and opt[-5:] == [
        "memory.chunked_loss=64", "eval.limit=2", "model.name=x", "owlore.gamma=2", "training.max_grad_norm=0"]
    assert env["MALLOC_MMAP_THRESHOLD_"] == "65536"
    data = json.loads((out / "bench.json").read_text())
    assert list(data["aggregate"]) == ["full", "owlore", "opt"] and data["columns"]["opt"]["method"] == "owlore"
    assert (out / "bench.md").is_file() and (out / "bench.png").is_file() and (out / "opt").is_dir()
    calls.clear()
    script.main(["--methods", "full", "--steps", "1", "--out", str(tmp_path / "c"), "--no-malloc-env"])
    assert "MALLOC_MMAP_THRESHOLD_" not in calls[0][1]
    for argv, message in ((["--methods", "full,nosuch"], "unknown methods ['nosuch']"),
                          (["--variants", "full=lora"], "label 'full' is taken"),
                          (["--variants", "x=nosuch"], "unknown method 'nosuch'"),
                          (["nosuch:a.b=1"], "[method:|label:]section.key=value: ['nosuch:a.b=1']")):
        with pytest.raises(SystemExit):
            script.main(["--steps", "1", "--out", str(tmp_path / "d"), *argv])
        assert message in capsys.readouterr().err


def test_bench_end_to_end_on_a_tiny_checkpoint(tmp_path):
    ckpt = support.save_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i}?", "output": str(2 * i)}) + "\n"
                            for i in range(8)))
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "eval/bench.py", "--methods", "full", "--variants",
                        "lisa1=lisa:lisa.gamma=1,lisa.interval=1", "--steps", "2", "--batch", "2", "--seq", "128",
                        "--out", str(out), f"model.name={ckpt}", f"data.train={data}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert [(x["method"], x["base_method"], x["status"]) for x in result["runs"]] == [
        ("full", "full", "ok"), ("lisa1", "lisa", "ok")]
    full, lisa = result["runs"]
    for run in (full, lisa):
        assert run["weights_bytes"] > 0 and run["activations_bytes"] > run["logits_bytes"] > 0
        assert run["optimizer_state_series"]["step"] == [1, 2] and run["memory_above_load_bytes"] is not None
    assert lisa["layer_switching"] and lisa["switches"] == 2 and not full["layer_switching"]
    assert lisa["gradients_bytes"] < full["gradients_bytes"]  # one of two layers trains
    md = (out / "bench.md").read_text()
    assert "| full | " in md and "| lisa1 | " in md and "eval/bench.py --methods full" in md
    assert (out / "bench.png").stat().st_size > 5000
    assert not (out / "full" / "final").exists()
