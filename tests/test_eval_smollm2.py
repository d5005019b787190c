"""Smoke tests on the real embedded SmolLM2-135M-Instruct, offline (marked slow: ~2 min on an idle 2-core CPU).

These check that a real checkpoint runs end to end through lm-eval with no network; the MMLU bound is a
chance-level sanity band for a 135M model, not a quality claim.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from eval_support import load_script  # noqa: E402

from owlore.evaluation import mmlu_dev_items  # noqa: E402

pytestmark = pytest.mark.slow


def test_mmlu_dev_zero_shot_runs_offline_near_chance(tmp_path, smollm2_path):
    out = tmp_path / "mmlu_dev.json"
    result = load_script("mmlu").main(["--split", "dev", "--shots", "0", "--model", "smollm2-135m-instruct",
                                       "--output", str(out)])
    mmlu = result["results"]["mmlu"]
    assert mmlu["n"] == len(mmlu_dev_items()) == sum(s["n"] for s in result["subtasks"].values())
    assert len(result["subtasks"]) == 57
    assert 0.1 < mmlu["acc"] < 0.45
    assert json.loads(out.read_text())["results"]["mmlu"] == mmlu


def test_demo_tasks_on_smollm2_use_its_chat_template(smollm2_path):
    from transformers import AutoTokenizer

    from owlore.data import build_demo_tasks, build_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert build_prompt(tokenizer, build_demo_tasks("test", 1)[0]).startswith("<|im_start|>")
    result = load_script("demo_tasks").main(["--model", "smollm2-135m-instruct", "--limit", "2"])
    per_task = {k: v for k, v in result["results"].items() if k != "overall"}
    assert len(per_task) == 7 and all(r["n"] == 2 and 0.0 <= r["acc"] <= 1.0 for r in per_task.values())
    assert result["results"]["overall"]["n"] == 14
