"""Free-form answer scoring: greedy generation on held-out instructions, scored like lm-eval scores answers.

Exact match is lm-eval's own ``exact_match`` (``lm_eval.api.metrics.exact_match_hf_evaluate``, case and punctuation
ignored); ROUGE-L is Google's ``rouge_score`` (what lm-eval's generative tasks such as TruthfulQA use); token F1 is
SQuAD's (lower-case, punctuation and articles removed, bag-of-tokens overlap). Used for the man-page task
(``owlore.data.real_tasks``) and any JSONL of ``instruction``/``output`` rows (``eval.answers`` in a config).
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)
PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of one prediction against one reference (both empty: 1, one empty: 0)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def first_line(text: str) -> str:
    """A generated answer up to its first line break: the task asks for one line."""
    return text.strip().split("\n", 1)[0].strip()


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L F of the predictions (lm-eval's EM, rouge_score's ROUGE-L)."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, at least one: {len(predictions)} vs "
                         f"{len(references)}")
    em = exact_match_hf_evaluate(list(predictions), list(references), ignore_case=True,
                                 ignore_punctuation=True)["exact_match"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    f1 = [token_f1(p, r) for p, r in zip(predictions, references, strict=True)]
    n = len(predictions)
    return {"exact_match": float(em), "f1": sum(f1) / n, "rougeL": sum(rouge) / n, "n": n}


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, max_new_tokens: int = 32,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to ``instruction`` rows, prompted exactly as in training (``owlore.data.formatting``).

    Batches are left-padded so every row's answer starts at the same position; the model's training mode and
    the tokenizer's padding side are restored afterwards.
    """
    from owlore.data.formatting import build_prompt

    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        for i in range(0, len(rows), batch_size):
            prompts = [build_prompt(tokenizer, r) for r in rows[i:i + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += [first_line(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return out


def evaluate_answers(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, limit: int | None = None,
                     max_new_tokens: int = 32, batch_size: int = 16, keep: int = 20) -> dict[str, Any]:
    """Generate and score; also the first ``keep`` (question, reference, prediction) triples to read."""
    rows = list(rows[:limit] if limit else rows)
    preds = generate_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    refs = [str(r["output"]) for r in rows]
    scores = score_answers(preds, refs)
    scores["average"] = scores["rougeL"]  # the headline metric (train.py prints "average")
    scores["samples"] = [{"instruction": r["instruction"], "reference": ref, "prediction": p}
                         for r, ref, p in list(zip(rows, refs, preds, strict=True))[:keep]]
    return scores
