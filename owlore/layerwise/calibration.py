"""Calibration text for the outlier ratios, and a JSON cache so the same request is never computed twice.

The paper (via OWL, arXiv 2310.05175) uses 128 random 2048-token windows of C4 (shard 0 of ``en``), seed 0.
Offline, any local text works: a ``.txt`` file (one document per blank-line-separated block), ``.json``/``.jsonl``
(``text``, instruction ``instruction``/``input``/``output`` or chat ``messages`` rows) or a ``datasets`` name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from owlore.optim.host import read_floats
from owlore.run.fileio import atomic_write

logger = logging.getLogger(__name__)

C4_ALIASES = {"c4", "allenai/c4"}


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration windows come from and how many (the cache key includes every field)."""

    source: str = "c4"
    """``c4``, a ``datasets`` hub name, or a local file/directory of text, JSON or JSONL."""
    nsamples: int = 128
    """Number of token windows (paper: 128)."""
    seqlen: int = 2048
    """Tokens per window (paper: 2048)."""
    seed: int = 0
    """Seed for document shuffling and window positions."""
    text_field: str = "text"
    split: str = "train"


def row_text(row: dict[str, Any], text_field: str = "text") -> str:
    """Plain text of one dataset row, whatever its format (plain, instruction or chat)."""
    if text_field in row and row[text_field] is not None:
        return str(row[text_field])
    if "messages" in row:
        return "\n".join(str(m.get("content", "")) for m in row["messages"])
    if "instruction" in row:
        parts = [row.get("instruction"), row.get("input"), row.get("output")]
        return "\n".join(str(p) for p in parts if p)
    raise KeyError(f"row has no '{text_field}', 'messages' or 'instruction' field (keys: {sorted(row)})")


def load_texts(source: str, *, text_field: str = "text", split: str = "train", seed: int = 0):
    """Yield documents from a local file/dir or a hub dataset, shuffled by ``seed``."""
    path = Path(source)
    if path.is_file() and path.suffix == ".txt":
        docs = [d.strip() for d in path.read_text().split("\n\n") if d.strip()]
        rng = torch.Generator().manual_seed(seed)
        for i in torch.randperm(len(docs), generator=rng).tolist():
            yield docs[i]
        return
    from datasets import load_dataset

    if path.exists():
        files = sorted(str(p) for p in path.glob("*.json*")) if path.is_dir() else [str(path)]
        ds = load_dataset("json", data_files=files, split="train")
    elif source.lower() in C4_ALIASES:
        ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    else:
        ds = load_dataset(source, split=split)
    for row in ds.shuffle(seed=seed):
        yield row_text(row, text_field)


def calibration_batches(tokenizer: Any, spec: CalibrationSpec, *, batch_size: int = 8) -> list[torch.Tensor]:
    """``spec.nsamples`` random token windows of ``spec.seqlen``, batched as ``[B, T]`` LongTensors.

    Documents are tokenised and concatenated (EOS between them) until there are enough tokens, then windows start
    at random offsets. If the text is shorter than one window, the window shrinks to the text (with a warning).
    """
    need = spec.nsamples * spec.seqlen
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for doc in load_texts(spec.source, text_field=spec.text_field, split=spec.split, seed=spec.seed):
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"] + eos)
        if len(stream) >= 2 * need:
            break
    if not stream:
        raise ValueError(f"calibration source {spec.source!r} produced no tokens")
    seqlen = spec.seqlen
    if len(stream) < seqlen:
        logger.warning("calibration text has %d tokens < seqlen %d; using one window of %d tokens",
                       len(stream), seqlen, len(stream))
        seqlen = len(stream)
    ids = torch.tensor(stream, dtype=torch.long)
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, len(stream) - seqlen + 1, (spec.nsamples,), generator=gen)
    windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    return list(torch.split(windows, batch_size))


def _abs_sum(p: torch.Tensor) -> torch.Tensor:
    """``sum(|p|)`` in fp32 as a 0-d tensor on ``p``'s device, without an fp32 copy of ``p``; an FSDP2 shard's sum is
    reduced over ranks first (a collective: every rank calls it)."""
    from owlore.parallel.sharded import is_sharded

    total = torch.linalg.vector_norm(p, ord=1, dtype=torch.float32 if p.element_size() < 8 else None)
    return total.full_tensor() if is_sharded(total) else total


def model_fingerprint(model: nn.Module) -> str:
    """Identity of a model for caching: its name/path, shapes and a checksum of every weight tensor.

    The checksum makes a fine-tuned model saved under the same path a different cache entry.
    """
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or type(model).__name__
    h = hashlib.sha256(name.encode())
    params = list(model.parameters())
    with torch.no_grad():
        values = read_floats([_abs_sum(p.detach()) for p in params])  # one host read per device
    h.update(str([tuple(p.shape) for p in params]).encode())
    h.update(" ".join(f"{v:.6e}" for v in values).encode())
    h.update(str(sum(p.numel() for p in params)).encode())
    return h.hexdigest()[:16]


class OutlierCache:
    """Outlier ratios stored as JSON files keyed by (model identity, threshold, calibration spec)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(model: nn.Module, threshold: float, spec: CalibrationSpec) -> dict[str, Any]:
        return {"model": model_fingerprint(model), "threshold": float(threshold), **asdict(spec)}

    def _path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.directory / f"lod-{digest}.json"

    def get(self, key: dict[str, Any]) -> torch.Tensor | None:
        path = self._path(key)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("key") != key:  # hash collision or hand-edited file
            return None
        logger.info("outlier ratios loaded from cache %s", path)
        return torch.tensor(data["ratios"], dtype=torch.float64)

    def put(self, key: dict[str, Any], ratios: torch.Tensor) -> Path:
        """Write atomically (temp file + rename), so a crash never leaves a half-written entry."""
        text = json.dumps({"key": key, "ratios": ratios.tolist()}, indent=1)
        return atomic_write(self._path(key), lambda tmp: Path(tmp).write_text(text))


def outlier_ratios_from_spec(
    model: nn.Module,
    tokenizer: Any,
    spec: CalibrationSpec,
    *,
    threshold: float = 5.0,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = False,
    layers: nn.ModuleList | None = None,
    batches: list[Any] | None = None,
) -> torch.Tensor:
    """Outlier ratios from a calibration dataset given by name or local file, through the cache if given.

    With ``batches`` the windows are not built from ``spec`` (``tokenizer`` may be None); ``spec`` then only
    names the data in the cache key, so it must identify those batches.
    """
    from owlore.layerwise.outliers import compute_outlier_ratios

    cache = OutlierCache(cache_dir) if cache_dir else None
    key = OutlierCache.key(model, threshold, spec) if cache else None
    if cache and (hit := cache.get(key)) is not None:
        return hit
    if batches is None:
        batches = calibration_batches(tokenizer, spec, batch_size=batch_size)
    t0 = time.perf_counter()
    ratios = compute_outlier_ratios(model, batches, threshold=threshold, progress=progress, layers=layers)
    logger.info("outlier ratios from %d batches (%s) in %.1f s", len(batches), spec.source, time.perf_counter() - t0)
    if cache:
        cache.put(key, ratios)
    return ratios
