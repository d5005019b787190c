"""Held-out accuracy of a LLaVA on the Fashion-MNIST grid questions, with or without visual-token pruning.

Closed-vocabulary scoring, as lm-eval scores multiple choice: each question's candidates are the answers of its kind
(10 item names, yes / no, or zero ... nine). The model's choice is the candidate with the highest log-likelihood
after the prompt. When the candidates of a kind start with distinct tokens (true for SmolLM2's tokenizer), the
first token decides, and one forward pass per batch scores every candidate. Otherwise each candidate's full
log-likelihood is computed by teacher forcing, one pass per candidate. The pruner, if given, prepares the inputs
of every pass exactly as at inference.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from owlore.data.fashion_vqa import CLASSES, NUMBERS

CANDIDATES: dict[str, tuple[str, ...]] = {"position": CLASSES, "presence": ("yes", "no"), "count": NUMBERS}


def _answer_ids(tokenizer: Any, word: str) -> list[int]:
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"]


def _first_tokens_unique(tokenizer: Any) -> bool:
    return all(len({_answer_ids(tokenizer, w)[0] for w in ws}) == len(ws) for ws in CANDIDATES.values())


def vqa_batch(rows: list[list[int]], images: list[Any], pad_id: int, model: Any) -> dict[str, torch.Tensor]:
    """Right-padded ids, mask and pixels, built on the host and moved to the model's device in one copy each."""
    from owlore.vision.llava import pixel_values

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    device = next(model.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "pixel_values": pixel_values(images, tower=model.model.vision_tower)}


def prepare_inputs(model, pruner, inputs):
    return inputs if pruner is None else pruner.prepare(model, **inputs)


@torch.no_grad()
def vqa_accuracy(model: Any, tokenizer: Any, examples: Sequence[Any], *, num_image_tokens: int, pruner: Any = None,
                 batch_size: int = 8) -> dict[str, Any]:
    """Accuracy overall and per question kind; ``examples`` are ``VQAExample`` (``owlore.data.fashion_vqa``).

    Right padding: every row's prompt ends at its own length, and the scored position is read per row.
    """
    from owlore.vision.llava import prompt_ids

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fast = _first_tokens_unique(tokenizer)
    correct: dict[str, list[bool]] = defaultdict(list)
    choices: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        prompts = [prompt_ids(tokenizer, e.question, num_image_tokens) for e in chunk]
        images = [e.image for e in chunk]
        if fast:
            inputs = prepare_inputs(model, pruner, vqa_batch(prompts, images, pad, model))
            logits = model(**inputs).logits
            last = inputs["attention_mask"].sum(1) - 1  # pruning shortens rows; the mask says where each ends
            ends = logits[torch.arange(len(chunk), device=logits.device), last]  # (rows, vocab)
            picks = [ends[i, [_answer_ids(tokenizer, w)[0] for w in CANDIDATES[e.kind]]].argmax()
                     for i, e in enumerate(chunk)]
            for e, pick in zip(chunk, torch.stack(picks).tolist()):  # one host read per batch
                choice = CANDIDATES[e.kind][pick]
                choices.append(choice)
                correct[e.kind].append(choice == e.answer)
            continue
        scores = [dict() for _ in chunk]
        for i, e in enumerate(chunk):
            for w in CANDIDATES[e.kind]:
                scores[i][w] = 0.0
        depth = max(len(CANDIDATES[e.kind]) for e in chunk)
        for j in range(depth):
            rows, owners = [], []
            for i, e in enumerate(chunk):
                words = CANDIDATES[e.kind]
                if j < len(words):
                    rows.append(prompts[i] + _answer_ids(tokenizer, words[j]))
                    owners.append((i, words[j], len(_answer_ids(tokenizer, words[j]))))
            inputs = prepare_inputs(model, pruner, vqa_batch(rows, [chunk[i].image for i, _, _ in owners], pad, model))
            logp = model(**inputs).logits.log_softmax(-1)
            ends = inputs["attention_mask"].sum(1).tolist()
            sums = []
            for r, (_, _, n) in enumerate(owners):
                ids = inputs["input_ids"][r, ends[r] - n:ends[r]]
                sums.append(logp[r, ends[r] - n - 1:ends[r] - 1].gather(-1, ids[:, None]).sum())
            for (i, word, _), value in zip(owners, torch.stack(sums).tolist()):  # one host read per pass
                scores[i][word] = value
        for i, e in enumerate(chunk):
            choices.append(max(scores[i], key=scores[i].get))
            correct[e.kind].append(choices[-1] == e.answer)
    flat = [c for v in correct.values() for c in v]
    return {"accuracy": sum(flat) / len(flat), "n": len(flat), "scoring": "first-token" if fast else "full",
            "choices": choices,
            "by_kind": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(correct.items())}}
