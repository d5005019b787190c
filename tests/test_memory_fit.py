"""``python -m owlore.memory --fit``: budgets, what fits (cheapest first, each within the budget), quality ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from owlore.memory.estimator import GIB
from owlore.memory.fit import fit, parse_budget, quality_ranks

ROOT = Path(__file__).resolve().parent.parent


def test_parse_budget_units_and_errors():
    assert parse_budget("24GiB") == 24 * GIB and parse_budget("80GB") == 80 * 10**9 and parse_budget("16") == 16 * GIB
    assert parse_budget("512 MiB") == 512 * 2**20
    for bad in ("", "-3GiB", "24TB", "lots"):
        with pytest.raises(ValueError, match="expected a size"):
            parse_budget(bad)


def test_quality_ranks_follow_the_held_out_metric(tmp_path):
    agg = {"full@3e-04": {"method": "full", "quality": {"answers:test.rougeL": {"mean": 0.5}}},
           "owl@3e-04": {"method": "owlore", "quality": {"answers:test.rougeL": {"mean": 0.6}}},
           "lora@1e-03": {"method": "lora", "quality": {"answers:test.rougeL": {"mean": 0.4}}}}
    chosen = {"full": {"key": "full@3e-04"}, "owl": {"key": "owl@3e-04"}, "lora": {"key": "lora@1e-03"}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"name": "s", "report": "answers:test", "aggregate": agg, "chosen": chosen}))
    ranks, note = quality_ranks(path)
    assert ranks == {"owlore": 1, "full": 2, "lora": 3} and "answers:test.rougeL" in note
    assert quality_ranks(tmp_path / "missing.json") == ({}, "")


def test_fit_lists_what_fits_cheapest_first_for_a_7b_model():
    result = fit("24GiB", "llama2_7b", seq=512, batch=16)
    fits = [c for c in result["candidates"] if c["fits"]]
    assert fits and all(c["total_bytes"] <= 24 * GIB for c in fits)
    assert not any(c["method"] == "full" and c["fits"] for c in result["candidates"])  # 7B full FT needs > 60 GB
    names = [line.split(" | ")[0].lstrip("| ") for line in result["table"].splitlines()[4:] if line.startswith("| ")]
    totals = {c["name"]: c["total_bytes"] for c in result["candidates"]}
    assert [totals[n] for n in names] == sorted(totals[n] for n in names)  # cheapest first
    assert {"owlore, checkpointing", "lora, checkpointing", "qlora, checkpointing"} <= set(names)
    assert len(fit("1GiB", "llama2_7b", seq=512, batch=16)["table"].split("nothing fits")) == 2


def test_fit_command_line_errors_exit_2_or_name_the_flag():
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "owlore.memory", *argv], capture_output=True, text=True,
                              cwd=ROOT, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})

    r = run("--fit", "24GiB")
    assert r.returncode == 2 and "--fit needs --model" in r.stderr
    r = run("--fit", "lots", "--model", "llama2_7b")
    assert r.returncode == 2 and "expected a size" in r.stderr
