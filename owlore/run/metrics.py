"""Run measurements (peak memory, step times) and OwLore's own TensorBoard scalars."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def peak_memory_bytes() -> int:
    """Peak accelerator memory if on CUDA, else the process's peak resident set size (RSS)."""
    return int(torch.cuda.max_memory_allocated()) if memory_kind() == "cuda" else _maxrss_bytes()


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def memory_kind() -> str:
    """What ``peak_memory_bytes`` and ``current_memory_bytes`` measure: ``"cuda"`` (allocated) or ``"rss"``."""
    return "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "rss"


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``); elsewhere the peak, the closest cheap figure."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _maxrss_bytes()


def current_memory_bytes() -> int:
    """CUDA memory allocated now if on CUDA, else the RSS now (the counterpart of ``peak_memory_bytes``)."""
    return int(torch.cuda.memory_allocated()) if memory_kind() == "cuda" else current_rss_bytes()


def reset_peak_memory() -> bool:
    """Start a new peak (CUDA peak stats; Linux: ``/proc/self/clear_refs`` 5 resets VmHWM and so ``ru_maxrss``).

    Lets a run report the peak of training alone, not of model loading or the evaluation before it. False where
    the platform cannot (the peak then stays the process's).
    """
    if memory_kind() == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_after_touch(model: nn.Module) -> int:
    """The RSS once every parameter and buffer has been read, so lazily mapped weights (safetensors mmap) are
    resident: what the loaded model costs, the baseline for "memory above the model". A sum reads without copying.
    """
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.numel() and t.device.type != "meta":
                t.data.sum()
    return current_rss_bytes()


class StepTimer(TrainerCallback):
    """Seconds and input tokens of every optimizer step (``on_step_begin`` to ``on_step_end``), and the peak
    memory of training alone (on CUDA also the peak reserved by the caching allocator).

    Put it first in the Trainer's callbacks: a layer switch made in another callback's ``on_step_begin``
    (OwLore, LISA, BAdam) then falls inside the step it precedes, so switch costs show in the mean step time.
    On CUDA each step is a pair of CUDA events recorded on the current stream, read once at the end of training
    (``seconds``), so timing adds no host sync per step and measures device time in stream order (kernels, not
    launches; a step waiting on the host shows as a gap inside it). Elsewhere it is the host clock. Tokens are
    ``state.num_input_tokens_seen`` deltas, so only counted with ``training.include_num_input_tokens_seen``.
    """

    def __init__(self) -> None:
        self._seconds: list[float] = []
        self._events: list[tuple[Any, Any]] = []  # CUDA (start, end) pairs not yet read
        self.tokens: list[int] = []
        self.memory_at_train_begin: int | None = None
        self.peak_before_train: int | None = None
        self.train_peak: int | None = None
        self.train_peak_reserved: int | None = None
        self.peak_reset = False
        self._t0: Any = None  # perf_counter() seconds, or a CUDA start event
        self._tokens0 = 0

    @property
    def seconds(self) -> list[float]:
        """Seconds of every timed step; on CUDA reading it waits once for the recorded events."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds.extend(start.elapsed_time(end) / 1e3 for start, end in self._events)
            self._events.clear()
        return self._seconds

    def on_train_begin(self, args, state, control, **kwargs):
        self.memory_at_train_begin = current_memory_bytes()
        self.peak_before_train = peak_memory_bytes()
        self.peak_reset = reset_peak_memory()
        if not self.peak_reset:
            logger.info("cannot reset the peak memory here: the training peak includes loading and evaluation")

    def on_step_begin(self, args, state, control, **kwargs):
        self._tokens0 = state.num_input_tokens_seen
        if memory_kind() == "cuda":
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is None:
            return
        if isinstance(self._t0, float):
            self._seconds.append(time.perf_counter() - self._t0)
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._t0, end))
        if args.include_num_input_tokens_seen not in ("no", False):
            self.tokens.append(int(state.num_input_tokens_seen - self._tokens0))
        self._t0 = None

    def on_train_end(self, args, state, control, **kwargs):
        self.train_peak = peak_memory_bytes()
        if memory_kind() == "cuda":  # what the caching allocator held: allocated + cached blocks (fragmentation)
            self.train_peak_reserved = int(torch.cuda.max_memory_reserved())

    def summary(self) -> dict[str, Any]:
        """The entries train.py adds to its run summary."""
        return {"memory_kind": memory_kind(), "step_seconds": self.seconds, "step_tokens": self.tokens or None,
                "memory_at_train_begin_bytes": self.memory_at_train_begin,
                "train_peak_memory_bytes": self.train_peak, "train_peak_is_training_only": self.peak_reset,
                "train_peak_reserved_bytes": self.train_peak_reserved}


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
