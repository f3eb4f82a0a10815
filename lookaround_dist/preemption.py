"""Preemption: a signal on any rank becomes one agreed stop step on all ranks.

The handler only sets a flag. The trainer calls :meth:`StopRequest.agreed` at every
round boundary: one small MAX all-reduce tells every rank whether any rank was signalled,
so all ranks stop after the same step, save one checkpoint and exit with
:data:`PREEMPTED_EXIT_CODE`, which the launch scripts read as "requeue me".
"""

from __future__ import annotations

import functools
import logging
import signal
from typing import Optional

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 85
"""Exit code of a run that saved a checkpoint because it was preempted; requeue it."""

log = logging.getLogger(__name__)


def ignore_in_loader_workers(loader, signal_names: tuple[str, ...]) -> None:
    """Make the worker processes of DataLoader ``loader`` ignore the stop signals.

    torchrun delivers its signals to the whole process group of a training process
    (os.killpg), which includes the DataLoader's worker processes, and torch gives those
    workers a SIGTERM handler that ends them. A stopping rank still needs its loader's
    workers for the steps up to the round boundary, so they ignore the signals instead;
    they still exit when the training process ends.
    """
    previous = loader.worker_init_fn
    loader.worker_init_fn = functools.partial(_ignore_signals, tuple(signal_names), previous)


def _ignore_signals(signal_names, previous, worker_id) -> None:
    for name in signal_names:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    if previous is not None:
        previous(worker_id)


class StopRequest:
    def __init__(self, signal_names: tuple[str, ...] = ("SIGTERM", "SIGUSR1")):
        self.received: Optional[str] = None
        self._previous = {}
        for name in dict.fromkeys(signal_names):
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        del frame
        if self.received is None:
            self.received = signal.Signals(number).name
            log.warning("received %s: the run stops at the next round boundary and saves a checkpoint",
                        self.received)

    def agreed(self, group=None, device: Optional[torch.device] = None) -> bool:
        """Return whether any rank received a stop signal, the same value on every rank."""
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
