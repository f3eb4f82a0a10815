"""Starting lookaround-train under a real torchrun from tests, bounded by a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun_train(nproc: int, overrides: list[str], timeout: float = 300.0, extra_args: list[str] = (),
                   config: str = "configs/demo.yaml", env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one training job; return the completed process (output in .stdout)."""
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc),
               "-m", "lookaround_dist.cli.train", "--config", config, *extra_args, *overrides]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    environment.update(env or {})
    return subprocess.run(command, cwd=REPO, env=environment, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def quick_overrides(run_dir: Path, **extra) -> list[str]:
    """A two-branch run on the demo subset, small enough for a test."""
    values = {
        "lookaround.num_branches": 2, "data.augmentations": "[hflip,vflip]",
        "data.backend": "torchvision", "data.batch_size": 32, "data.num_workers": 0,
        "train.max_steps_per_epoch": 8, "train.epochs": 2, "lookaround.k": 3,
        "train.output_dir": str(run_dir.parent), "train.run_name": run_dir.name,
        "optim.lr": 0.05, "optim.warmup_epochs": 0,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]
