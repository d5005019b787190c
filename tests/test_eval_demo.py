"""Demo task set evaluation: per-task accuracies, counts, and scoring right after the training prompt."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import eval_support as support  # noqa: E402
from eval_support import load_script  # noqa: E402

from owlore.data import DEMO_TASKS, build_demo_tasks, build_prompt  # noqa: E402
from owlore.evaluation import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return support.save_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


def test_demo_script_per_task_accuracy_and_counts(tmp_path, tiny_model_dir):
    out = tmp_path / "demo.json"
    result = load_script("demo_tasks").main(["--model", str(tiny_model_dir), "--n", "35", "--seed", "3",
                                             "--output", str(out)])
    counts = Counter(ex["task"] for ex in build_demo_tasks("test", 35, seed=3))
    assert list(result["results"]) == [*counts, "overall"]
    assert set(counts) <= set(DEMO_TASKS)
    for task, n in counts.items():
        r = result["results"][task]
        assert r["n"] == n and 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0
    overall = result["results"]["overall"]
    assert overall["n"] == 35
    # the overall entry is the item-weighted mean of the task types (lm-eval's group aggregate)
    assert overall["acc"] == pytest.approx(sum(result["results"][t]["acc"] * n for t, n in counts.items()) / 35)
    assert result["average"] == overall["acc"] and result["seed"] == 3 and out.is_file()


def _choice_logprob(model, tokenizer, prompt: str, choice: str) -> float:
    """log p(choice | prompt) with the answer appended directly after the prompt, as in training."""
    context = prompt.rstrip()  # lm-eval scores trailing whitespace of the context as part of the continuation
    ctx_ids = tokenizer(context).input_ids
    ids = tokenizer(prompt + choice).input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(logprobs[i - 1, ids[i]] for i in range(len(ctx_ids), len(ids))))


def test_demo_accuracy_equals_direct_loglikelihood_scoring():
    """Independent of lm-eval: argmax over choices of log p(choice | build_prompt(example))."""
    model, tokenizer = support.tiny_model(seed=2), support.tokenizer()
    examples = build_demo_tasks("test", 28, seed=1)
    result = evaluate(model, tokenizer, suite="demo", examples=examples)
    correct: dict[str, list[bool]] = {}
    for ex in examples:
        prompt = build_prompt(tokenizer, ex)
        scores = [_choice_logprob(model, tokenizer, prompt, c) for c in ex["choices"]]
        correct.setdefault(ex["task"], []).append(max(range(len(scores)), key=scores.__getitem__) == ex["label"])
    for task, hits in correct.items():
        assert result["results"][task]["acc"] == pytest.approx(sum(hits) / len(hits)), task
    assert result["results"]["overall"]["acc"] == pytest.approx(sum(map(sum, correct.values())) / 28)


def test_demo_uses_the_chat_template_when_the_tokenizer_has_one(tmp_path):
    """Prompts are rendered per tokenizer: a chat template changes the prompt, hence (here) the scores."""
    tokenizer = support.train_tokenizer()
    examples = build_demo_tasks("test", 14, seed=0)
    model = support.tiny_model(seed=4)
    plain = evaluate(model, tokenizer, suite="demo", examples=examples)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert build_prompt(tokenizer, examples[0]).endswith("<|assistant|>")
    chat = evaluate(model, tokenizer, suite="demo", examples=examples)
    assert chat["results"]["overall"]["n"] == plain["results"]["overall"]["n"] == 14
    assert chat["results"] != plain["results"]
