"""Run measurements (peak memory) and OwLore's own TensorBoard scalars."""

from __future__ import annotations

import os
import resource
import sys

import torch


def peak_memory_bytes() -> int:
    """Peak accelerator memory if on CUDA, else the process's peak resident set size (RSS)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def owlore_tensorboard_dir(output_dir: str | os.PathLike) -> str:
    """Where OwLore's scalars go: beside the Trainer's TensorBoard logs, in an ``owlore`` subdirectory."""
    root = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(output_dir, "runs")
    return os.path.join(root, "owlore")


class OwLoreLogger:
    """A ``SummaryWriter`` beside the Trainer's: active layers, activation counts, state bytes, SVD time."""

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def switch(self, step: int, active: list[int], counts: torch.Tensor) -> None:
        for i, c in enumerate(counts.tolist()):
            self.writer.add_scalar(f"owlore/layer_count/{i:02d}", c, step)
        self.writer.add_text("owlore/active_layers", ", ".join(map(str, active)), step)
        self.writer.add_histogram("owlore/active_layer_index", torch.tensor(active, dtype=torch.float32), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
