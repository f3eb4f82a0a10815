"""Optional wandb tracking from global rank 0, offline unless configured.

Tracking starts when ``wandb.enabled`` is true. The mode comes from the ``WANDB_MODE``
environment variable, else from ``wandb.mode`` (offline by default), so a run writes
to the network only when one of them is ``online``. Offline runs land in
``WANDB_DIR`` when it is set, else in the run directory (``<run dir>/wandb/offline-run-*``),
and ``wandb sync`` uploads them later.

A resumed or requeued run passes the wandb run id saved in its checkpoint back in, and
logging continues in the same wandb run. Metrics are plotted against the key
``global_step`` (the optimizer step count) instead of wandb's own step counter, because a
run resumed from an older checkpoint logs steps that wandb has already seen, and wandb
drops values logged at a step lower than its counter.

A failure of wandb (missing package, unwritable folder, network, a dead wandb-core
process) is logged once and turns tracking off, and it never stops training.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

STEP_KEY = "global_step"
"""The metric that every other metric is plotted against."""


def flatten_lists(values: dict) -> dict:
    """Replace each list of numbers with one key per element.

    Every list in the trainer's records contains one number per branch (``train_loss``,
    ``branch_test_top1``), so ``train_loss: [a, b]`` becomes ``train_loss_branch_0: a,
    train_loss_branch_1: b``, which wandb plots as two curves instead of storing one
    opaque list.
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            for index, element in enumerate(value):
                flat[f"{key}_branch_{index}"] = element
        else:
            flat[key] = value
    return flat


class Tracker:
    """The wandb run of one training run, or a no-op on other ranks and when disabled.

    ``run_id`` is the id of the wandb run to continue (from a checkpoint), or None for a
    new one. After construction, :attr:`run_id` is the id to save in checkpoints.
    """

    def __init__(self, config, run_dir: Path, rank: int, run_id: Optional[str]):
        self.run = None
        self.run_id = run_id
        settings = config.wandb
        if rank != 0 or not settings.enabled:
            return
        mode = os.environ.get("WANDB_MODE") or settings.mode
        if mode == "disabled":
            log.info("wandb: disabled (WANDB_MODE or wandb.mode)")
            return
        folder = os.environ.get("WANDB_DIR") or str(run_dir)
        try:
            import wandb

            self.run = wandb.init(
                project=settings.project, entity=settings.entity,
                name=settings.name or run_dir.name, tags=list(settings.tags),
                config=config.to_dict(), dir=folder, mode=mode,
                id=run_id, resume="allow" if run_id else None,
            )
            self.run.define_metric(STEP_KEY)
            self.run.define_metric("*", step_metric=STEP_KEY)
        except Exception as error:  # wandb raises many types, and none may stop training
            log.warning("wandb: init failed in %s mode (folder %s), training continues without "
                        "tracking: %s: %s", mode, folder, type(error).__name__, error)
            self._finish_quietly()
            return
        self.run_id = self.run.id
        if run_id:
            log.info("wandb: continuing run %s in %s mode, files in %s", self.run_id, mode, self.run.dir)
        else:
            log.info("wandb: started run %s in %s mode, files in %s", self.run_id, mode, self.run.dir)

    @property
    def active(self) -> bool:
        """Whether values passed to :meth:`log` reach wandb."""
        return self.run is not None

    def log(self, values: dict, step: int) -> None:
        """Log ``values`` at optimizer step ``step``. A failure turns tracking off."""
        if self.run is None:
            return
        try:
            self.run.log({**flatten_lists(values), STEP_KEY: step})
        except Exception as error:
            log.warning("wandb: logging at step %d failed, tracking is turned off for the rest "
                        "of the run: %s: %s", step, type(error).__name__, error)
            self._finish_quietly()

    def finish(self) -> None:
        """Close the wandb run, writing its last values. A failure is logged."""
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as error:
            log.warning("wandb: finishing run %s failed: %s: %s", self.run_id, type(error).__name__, error)
        self.run = None

    def _finish_quietly(self) -> None:
        """Drop a broken run. wandb may fail again while closing it, which changes nothing."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=1)
        except Exception:
            log.debug("wandb: closing the failed run raised as well", exc_info=True)
