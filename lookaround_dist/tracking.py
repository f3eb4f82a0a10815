"""Optional wandb tracking from global rank 0, offline unless configured.

A failure of wandb (missing package, unwritable folder, network) is logged once and
turns tracking off; it never stops training.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, config, run_dir: Path, rank: int, run_id: Optional[str]):
        self.run = None
        self.run_id = run_id
        settings = config.wandb
        if rank != 0 or not settings.enabled:
            return
        mode = os.environ.get("WANDB_MODE", settings.mode)
        if mode == "disabled":
            log.info("wandb: disabled")
            return
        try:
            import wandb

            self.run = wandb.init(
                project=settings.project, entity=settings.entity,
                name=settings.name or run_dir.name, tags=list(settings.tags),
                config=config.to_dict(), dir=str(run_dir), mode=mode,
                id=run_id, resume="allow" if run_id else None,
            )
            self.run_id = self.run.id
            log.info("wandb: run %s in %s mode", self.run_id, mode)
        except Exception as error:  # wandb raises many types; none may stop training
            log.warning("wandb: init failed, training goes on without it: %s", error)
            self.run = None

    def log(self, values: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(values, step=step)
        except Exception as error:
            log.warning("wandb: logging failed, tracking is turned off: %s", error)
            self.run = None

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as error:
            log.warning("wandb: finish failed: %s", error)
        self.run = None
