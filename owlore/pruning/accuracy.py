"""Accuracy of any supported VLM on a VQA set (``owlore.data.vqa_files``), with or without visual-token pruning.

Rows with ``choices`` are scored as lm-eval scores multiple choice: the model's answer is the choice with the
highest log-likelihood after the prompt, summed by teacher forcing, one pass per choice. When every choice is one
token, that is the next-token distribution, and one forward pass scores every choice of every row in the batch
(``scoring="first-token"`` also takes that pass for multi-token choices with distinct first tokens: faster, and an
approximation that says so in the result). Rows with only an ``answer`` are answered by greedy ``generate``
and scored by exact match (SQuAD normalisation: case, punctuation and articles ignored) and token F1. The pruner, if
given, prepares the inputs of every pass exactly as at inference.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from owlore.data.vqa_files import VQARecord, load_image
from owlore.evaluation.answers import first_line, normalize_answer, token_f1
from owlore.pruning.vlm_inputs import Prompter, move_inputs

__all__ = ["SCORINGS", "continuation_scores", "prepare_inputs", "summarise", "vqa_accuracy"]


def prepare_inputs(model: Any, pruner: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` on the model's device, pruned by ``pruner`` (None: unpruned)."""
    inputs = move_inputs(inputs, model)
    return inputs if pruner is None else pruner.prepare(model, **inputs)


def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (left or right padding)."""
    return mask.shape[1] - 1 - mask.flip(1).long().argmax(1)


def _score_first_tokens(model, prompter, pruner, chunk, prompts, images, firsts) -> list[str]:
    inputs = prepare_inputs(model, pruner, prompter.batch(prompts, images))
    logits = model(**inputs).logits
    ends = logits[torch.arange(len(chunk), device=logits.device), _last_positions(inputs["attention_mask"])]
    picks = torch.stack([ends[i, f].argmax() for i, f in enumerate(firsts)]).tolist()  # one host read
    return [r.choices[p] for r, p in zip(chunk, picks)]


def continuation_scores(model: Any, inputs: dict[str, Any], answers: Sequence[list[int]]) -> list[tuple[float, bool]]:
    """Per row of a batch built with ``Prompter.batch(answers=...)`` (and pruned): the summed log-likelihood of its
    answer tokens, and whether greedy decoding would produce them (lm-eval's ``is_greedy``)."""
    logp = model(**inputs).logits.float().log_softmax(-1)
    ends = (_last_positions(inputs["attention_mask"]) + 1).tolist()
    sums, greedy = [], []
    for row, ids in enumerate(answers):
        end, n = ends[row], len(ids)
        target, scores = inputs["input_ids"][row, end - n:end], logp[row, end - n - 1:end - 1]
        sums.append(scores.gather(-1, target[:, None]).sum())
        greedy.append((scores.argmax(-1) == target).all())
    return list(zip(torch.stack(sums).tolist(), torch.stack(greedy).tolist()))  # one host read per batch


def _score_full(model, prompter, pruner, chunk, prompts, images) -> list[str]:
    scores = [dict.fromkeys(r.choices, 0.0) for r in chunk]
    for j in range(max(len(r.choices) for r in chunk)):
        owners = [i for i, r in enumerate(chunk) if j < len(r.choices)]
        answers = [prompter.answer_ids(prompts[i], chunk[i].choices[j]) for i in owners]
        batch = prompter.batch([prompts[i] for i in owners], [images[i] for i in owners], answers=answers)
        for i, (value, _) in zip(owners, continuation_scores(model, prepare_inputs(model, pruner, batch), answers)):
            scores[i][chunk[i].choices[j]] = value
    return [max(s, key=s.get) for s in scores]


def _generate(model, prompter, pruner, chunk, prompts, images, max_new_tokens) -> list[str]:
    inputs = prepare_inputs(model, pruner, prompter.batch(prompts, images, padding_side="left"))
    tok = prompter.tokenizer
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [first_line(t) for t in tok.batch_decode(new, skip_special_tokens=True)]


SCORINGS = ("auto", "first-token", "full")
"""``auto``: a row's first answer token decides only when every choice is one token (then it is the exact
log-likelihood), else the full log-likelihood; ``first-token``: the first token decides whenever the choices' first
tokens differ (an approximation for multi-token choices, one pass per batch: the Fashion benchmark's scoring, with
train.py's); ``full``: always the summed log-likelihood of every choice."""


def _fast_tokens(prompter: Prompter, prompt: str, record: VQARecord, scoring: str) -> list[int] | None:
    """The first answer token of each choice if ``scoring`` lets the first token decide this row, else None."""
    if scoring == "full":
        return None
    ids = [prompter.answer_ids(prompt, c) for c in record.choices]
    if scoring == "auto" and any(len(i) != 1 for i in ids):
        return None
    firsts = [i[0] for i in ids]
    return firsts if len(set(firsts)) == len(firsts) else None


@torch.no_grad()
def vqa_accuracy(model: Any, processor: Any, records: Sequence[VQARecord], *, pruner: Any = None,
                 batch_size: int = 8, prompt: str | None = None, max_new_tokens: int = 16,
                 scoring: str = "auto") -> dict[str, Any]:
    """Accuracy overall and per kind, and each row's prediction, in ``records``' order.

    Args:
        model: A VLM the pruner supports (``owlore.pruning.models``), in eval mode.
        processor: Its HF processor (``owlore.pruning.vlm_inputs.load_processor``).
        records: The questions.
        pruner: A ``VisualTokenPruner``, or None for the unpruned model.
        prompt: A template with ``{question}`` and the image token; None: the processor's chat template.
        max_new_tokens: Generation length of rows without choices.
        scoring: How choice rows are scored (:data:`SCORINGS`).

    Returns:
        ``accuracy`` (exact match for generated rows), ``n``, ``scoring`` (the paths the rows took),
        ``by_kind`` (``{kind: {accuracy, n}}``), ``predictions``, and ``f1`` when some rows were generated.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    model.eval()
    prompter = Prompter(processor, prompt)
    prompts = [prompter.prompt(r.question) for r in records]
    firsts = [None if r.choices is None else _fast_tokens(prompter, p, r, scoring) for p, r in zip(prompts, records)]
    paths = {"generate": [i for i, r in enumerate(records) if r.choices is None],
             "first-token": [i for i, f in enumerate(firsts) if f is not None],
             "full": [i for i, (r, f) in enumerate(zip(records, firsts)) if r.choices is not None and f is None]}
    predictions: list[str | None] = [None] * len(records)
    for how, rows in paths.items():
        for start in range(0, len(rows), batch_size):
            group = rows[start:start + batch_size]
            chunk, texts = [records[i] for i in group], [prompts[i] for i in group]
            images = [load_image(r.image) for r in chunk]
            if how == "generate":
                picked = _generate(model, prompter, pruner, chunk, texts, images, max_new_tokens)
            elif how == "first-token":
                picked = _score_first_tokens(model, prompter, pruner, chunk, texts, images, [firsts[i] for i in group])
            else:
                picked = _score_full(model, prompter, pruner, chunk, texts, images)
            for i, p in zip(group, picked):
                predictions[i] = p
    return summarise(records, predictions, {how for how, rows in paths.items() if rows})


def summarise(records: Sequence[VQARecord], predictions: Sequence[str], scoring: set[str] | None = None
              ) -> dict[str, Any]:
    """Accuracy overall and per kind of ``predictions`` against the records' answers."""
    correct: dict[str, list[bool]] = defaultdict(list)
    f1s = []
    for r, p in zip(records, predictions, strict=True):
        if r.choices is not None:
            correct[r.kind].append(p == r.answer)
        else:
            correct[r.kind].append(normalize_answer(p) == normalize_answer(r.answer))
            f1s.append(token_f1(p, r.answer))
    flat = [c for v in correct.values() for c in v]
    out = {"accuracy": sum(flat) / len(flat), "n": len(flat), "scoring": "+".join(sorted(scoring or ())),
           "predictions": list(predictions),
           "by_kind": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(correct.items())}}
    if f1s:
        out["f1"] = sum(f1s) / len(f1s)
    return out
