"""Ctrl-C and SIGTERM stop a training run at a checkpoint instead of losing the steps since the last one.

The first SIGINT or SIGTERM only sets a flag: the current optimizer step finishes, the Trainer writes a checkpoint
(with its manifest, ``owlore.run.resume``) and training stops; ``train.py`` then prints where the checkpoint is and the
command that resumes it, and exits 130 (SIGINT) or 143 (SIGTERM), as a shell expects of a signalled process.
A second signal while that happens is not waited on: the default action (KeyboardInterrupt / termination).

On several processes every rank must stop at the same step, or the ranks that go on wait forever in their next
collective: the flag is combined across ranks (a MAX all-reduce of one number) at each step end. That is one small
collective per step, only when ``WORLD_SIZE > 1``.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


class StopOnSignal(TrainerCallback):
    """Turns the first SIGINT / SIGTERM during ``trainer.train()`` into "checkpoint after this step, then stop".

    ``received`` holds the signal number once one arrived (on any rank).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args):
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Put the handlers that were there before ``on_train_begin`` back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # a second signal: do what it would have done without us
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        logger.warning("%s received: finishing this step, then writing a checkpoint and stopping (send it again "
                       "to stop at once, without a checkpoint)", signal.Signals(signum).name)

    def _any_rank_received(self, args) -> bool:
        if args.world_size < 2 or not torch.distributed.is_initialized():
            return self.received is not None
        from owlore.parallel.distributed import comm_device

        flag = torch.tensor([self.received or 0], dtype=torch.int64)
        flag = flag.to(comm_device(None, flag.device))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        value = int(flag.item())
        if value and self.received is None:
            self.received = value
        return bool(value)
