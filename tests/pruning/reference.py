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
