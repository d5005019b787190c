"""Naive python-loop references the vectorised pruning code is checked against."""

from __future__ import annotations

import math

import torch


def head_mean_attention_loop(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    batch, heads, tokens, _ = query.shape
    out = torch.zeros(batch, tokens, tokens, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(tokens):
                logits = [float(query[b, h, i] @ key[b, h, j]) * scale for j in range(tokens)]
                top = max(logits)
                exps = [math.exp(v - top) for v in logits]
                for j in range(tokens):
                    out[b, i, j] += exps[j] / sum(exps) / heads
    return out


def fopru_significance_loop(attention: torch.Tensor) -> torch.Tensor:
    batch, n, _ = attention.shape
    out = torch.zeros(batch, n, dtype=torch.float64)
    for b in range(batch):
        col = [sum(float(attention[b, i, j]) for i in range(n)) / n for j in range(n)]
        row = [sum(float(attention[b, i, j]) for j in range(n)) / n for i in range(n)]

        def var(v):
            mean = sum(v) / len(v)
            return sum((x - mean) ** 2 for x in v) / (len(v) - 1)

        out[b] = torch.tensor(col if var(col) > var(row) else row)
    return out


def greedy_loop(features: torch.Tensor, k: int, first: int, weight: list[float] | None = None) -> list[int]:
    """O(k^2 N) greedy: each step recomputes every candidate's min distance to all picks."""
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    n = unit.shape[0]
    picks = [first]
    while len(picks) < k:
        best, best_score = None, -math.inf
        for i in range(n):
            if i in picks:
                continue
            div = min(1.0 - float(unit[i] @ unit[j]) for j in picks)
            score = div * (weight[i] if weight is not None else 1.0)
            if score > best_score:
                best, best_score = i, score
        picks.append(best)
    return sorted(picks)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def dpp_greedy_logdet_loop(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy DPP MAP by brute force: each step adds the token that maximises log det of the kept sub-kernel."""
    kernel = kernel.double()
    chosen: list[int] = []
    for _ in range(k):
        best, best_value = None, -math.inf
        for i in range(kernel.shape[0]):
            if i in chosen:
                continue
            idx = torch.tensor([*chosen, i])
            value = float(torch.logdet(kernel[idx][:, idx]))
            if value > best_value:
                best, best_value = i, value
        chosen.append(best)
    return sorted(chosen)


def relevance_loop(projected: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(projected.shape[:2], dtype=torch.float64)
    for b in range(projected.shape[0]):
        rows = [t for t in range(text.shape[1]) if mask[b, t]]
        for i in range(projected.shape[1]):
            out[b, i] = sum(float(torch.cosine_similarity(projected[b, i], text[b, t], dim=0)) for t in rows) / len(rows)
        low, high = float(out[b].min()), float(out[b].max())
        out[b] = (out[b] - low + 1e-6) / (high - low + 1e-6)
    return out


def visionzip_loop(cls_scores: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, k: int,
                   contextual: int) -> tuple[list[list[int]], torch.Tensor]:
    """VisionZip per image with python lists: positions and the output tokens (pre-projector)."""
    positions, outputs = [], []
    for b in range(cls_scores.shape[0]):
        n = cls_scores.shape[1]
        order = sorted(range(n), key=lambda i: -float(cls_scores[b, i]))
        dominant = order[: k - contextual]
        tokens = {i: features[b, i].double() for i in dominant}
        remaining = [i for i in range(n) if i not in dominant]
        if contextual:
            step = max(1, len(remaining) // contextual)
            targets = [remaining[s] for s in range(0, len(remaining), step)][:contextual]
            groups = {t: [] for t in targets}
            for i in remaining:
                if i in targets:
                    continue
                sims = [float(torch.cosine_similarity(keys[b, i], keys[b, t], dim=0)) for t in targets]
                groups[targets[max(range(len(targets)), key=lambda j: sims[j])]].append(i)
            for t, members in groups.items():
                merged = features[b, t].double()
                if members:
                    merged = merged + sum(features[b, i].double() for i in members) / len(members)
                tokens[t] = merged
        keep = sorted(tokens)
        positions.append(keep)
        outputs.append(torch.stack([tokens[i] for i in keep]))
    return positions, torch.stack(outputs)


def llm_stage_greedy_loop(model, ids, mask, pixels, keep_prompt, steps, layer):
    """Greedy decoding without a cache: every step recomputes the whole sequence, pruning the same prompt
    positions after ``layer`` and keeping every generated token. Returns ``(tokens, per-step last logits)``."""
    out, scores = [], []
    for _ in range(steps):
        length = ids.shape[1]
        generated = torch.arange(length - len(out), length)[None].expand(ids.shape[0], -1)
        keep = torch.cat([keep_prompt, generated], 1)
        logits = llm_stage_logits_loop(model, ids, mask, pixels, keep, layer)
        token = logits[:, -1].argmax(-1)
        out.append(token)
        scores.append(logits[:, -1])
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1), torch.stack(scores, 1)


def llm_stage_logits_loop(model, ids, mask, pixels, keep, layer, features=None):
    """Uncached LLaVA forward, layer by layer: every token through layers < ``layer``, then only the ``keep``
    positions; original positions throughout; returns the logits of the kept positions. ``features``
    (``(images, n, d_l)``) replace the projected image features (a prompt pruned before the LLM)."""
    from owlore.pruning.llava import encode_images

    from .helpers import IMAGE_TOKEN

    lm = model.model.language_model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids.clamp_max(model.config.text_config.vocab_size - 1))
        feats = features if features is not None else model.model.multi_modal_projector(
            encode_images(model, pixels, attention=False).features)
        embeds[ids == IMAGE_TOKEN] = feats.reshape(-1, feats.shape[-1])
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        length = ids.shape[1]
        allowed = (torch.ones(length, length, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]) \
            | torch.eye(length, dtype=torch.bool)[None]
        rows = torch.arange(ids.shape[0])[:, None]
        hidden = embeds
        for i, decoder_layer in enumerate(lm.layers):
            if i == layer:
                hidden, positions = hidden[rows, keep], positions[rows, keep]
                allowed = allowed[rows, keep].gather(2, keep[:, None, :].expand(-1, keep.shape[1], -1))
            cos, sin = lm.rotary_emb(hidden, positions)
            hidden = decoder_layer(hidden, attention_mask=allowed[:, None], position_embeddings=(cos, sin),
                                   position_ids=positions)
        return model.lm_head(lm.norm(hidden))
