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
    assert len(per_task) == 7 and all(r["n"] == 2 for r in per_task.values())
    assert result["results"]["overall"]["n"] == 14
    # a naive reference loop: the first 2 items of each task, each choice's summed log-likelihood right after the
    # rendered prompt (no delimiter), tokenised as lm-eval does (the continuation is what the whole adds to the
    # context), argmax against the label
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    items: dict[str, list[dict]] = {}
    for ex in build_demo_tasks("test"):
        items.setdefault(ex["task"], []).append(ex)

    def loglik(context: str, choice: str) -> float:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))

    for task, exs in items.items():
        right = [max(range(len(e["choices"])), key=lambda j, e=e: loglik(build_prompt(tokenizer, e), e["choices"][j]))
                 == e["label"] for e in exs[:2]]
        assert per_task[task]["acc"] == pytest.approx(sum(right) / 2), task
