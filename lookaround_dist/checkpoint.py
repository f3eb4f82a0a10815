"""Checkpoints: a folder per save, written by several ranks and committed by one.

Layout of ``RUN_DIR/checkpoints/step-000001234/``:

* ``meta.pt``: counters, data position, layout and model of the run (global rank 0);
* ``consensus.pt``: the consensus state dict (global rank 0);
* ``branch-<b>.pt``: branch ``b``'s optimizer, scheduler and gradient scaler, and its
  weights when the save falls inside a round (written by the branch's first rank);
* ``rank-<r>.pt``: the random states of rank ``r`` (every rank).

Every file is written to a temporary name, flushed with fsync and renamed. The folder is
first written as ``*.partial`` and renamed by global rank 0 once every rank has finished
(after a barrier), so a crash during a save leaves no folder that looks complete and the
previous checkpoint stays loadable. Files are read with ``torch.load(weights_only=True)``,
which never runs code from the file.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the run."""


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with torch.save to ``path`` through a temporary file, fsync and rename."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"cannot load checkpoint file {path}: {error}") from None


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:09d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = [p for p in list_checkpoints(root) if (p / "meta.pt").is_file()]
    return found[-1] if found else None


def partial_path(root: Path, global_step: int) -> Path:
    return root / (checkpoint_name(global_step) + ".partial")


def prepare_folder(root: Path, global_step: int) -> Path:
    """Create (or empty) the partial folder of this save; called on global rank 0 only."""
    folder = partial_path(root, global_step)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def commit_folder(root: Path, global_step: int, keep: int) -> Path:
    """Rename the finished partial folder into place and prune old checkpoints (rank 0)."""
    folder = partial_path(root, global_step)
    final = root / checkpoint_name(global_step)
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # a save of the same step from an earlier attempt
        shutil.rmtree(final)
    os.replace(folder, final)
    fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def random_states() -> dict:
    """Python, NumPy, torch CPU and CUDA random states, as tensors and plain values."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    states = {
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_random_states(states: dict) -> None:
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = states["numpy"]
    np.random.set_state((
        numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
        numpy["has_gauss"], numpy["cached_gaussian"],
    ))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def check_compatible(meta: dict, expected: dict, folder: Path) -> None:
    """Raise CheckpointError listing every layout field in which ``meta`` differs from the run."""
    differences = [
        f"{key}: checkpoint has {meta.get(key)!r}, this run has {value!r}"
        for key, value in expected.items() if meta.get(key) != value
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {folder} does not fit this run: " + "; ".join(differences)
            + ". Resume with the same model, number of branches and world layout, or start a new run."
        )
