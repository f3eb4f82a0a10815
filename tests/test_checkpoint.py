"""Checkpoint safety: atomic writes, a crash during a save, unsafe pickles, layout checks."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lookaround_dist import checkpoint as ckpt

pytestmark = pytest.mark.timeout(60)

WRITER = """
import sys, torch
from pathlib import Path
from lookaround_dist.checkpoint import atomic_save
big = torch.ones(64, 1024, 1024)  # 256 MiB, so that the write takes a while
while True:
    atomic_save({"weights": big}, Path(sys.argv[1]))
"""


class RunsCode:
    """A pickle that creates a file when unpickled, as a malicious checkpoint would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_checkpoint(root: Path, step: int, value: float) -> Path:
    ckpt.prepare_folder(root, step)
    folder = ckpt.partial_path(root, step)
    ckpt.atomic_save({"weights": torch.full((4,), value)}, folder / "consensus.pt")
    ckpt.atomic_save({"layout": {"model": "resnet20"}}, folder / "meta.pt")
    return ckpt.commit_folder(root, step, keep=2)


def test_writer_killed_mid_save_keeps_old_file(tmp_path):
    path = tmp_path / "consensus.pt"
    ckpt.atomic_save({"weights": torch.zeros(3)}, path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    temporary = path.with_name(path.name + ".tmp")
    try:
        deadline = time.monotonic() + 45
        while not (temporary.exists() and temporary.stat().st_size > 1 << 20):
            assert time.monotonic() < deadline, "the writer never started writing"
            assert writer.poll() is None, "the writer exited"
            time.sleep(0.01)
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(10)
    # Killed mid-write, or between two writes: either way the file is whole.
    state = ckpt.load_file(path)
    assert state["weights"].shape in {(3,), (64, 1024, 1024)}


def test_partial_folder_ignored_on_resume(tmp_path):
    root = tmp_path / "checkpoints"
    good = write_checkpoint(root, 10, 1.0)
    # A save of step 20 that crashed: the folder is still partial, one file is truncated.
    partial = ckpt.prepare_folder(root, 20)
    (partial / "consensus.pt").write_bytes(b"PK\x03\x04 truncated")
    (partial / "meta.pt.tmp").write_bytes(b"")
    assert ckpt.latest_checkpoint(root) == good
    assert ckpt.list_checkpoints(root) == [good]
    assert torch.equal(ckpt.load_file(good / "consensus.pt")["weights"], torch.ones(4))
    with pytest.raises(ckpt.CheckpointError, match="cannot load checkpoint file"):
        ckpt.load_file(partial / "consensus.pt")


def test_last_checkpoints_kept(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        write_checkpoint(root, step, float(step))
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000000002", "step-000000003"]


def test_code_running_pickle_rejected(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "consensus.pt"
    torch.save({"weights": torch.zeros(2), "payload": RunsCode(marker)}, path)
    with pytest.raises(ckpt.CheckpointError, match="cannot load checkpoint file"):
        ckpt.load_file(path)
    assert not marker.exists()

    # The same through a plain pickle file, which torch.load also reads.
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_file(plain)
    assert not marker.exists()


def test_mismatched_layout_lists_differences(tmp_path):
    saved = {"model": "resnet20", "num_classes": 10, "num_branches": 3, "world_size": 4}
    run = {"model": "resnet32", "num_classes": 10, "num_branches": 2, "world_size": 2}
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.check_compatible(saved, run, tmp_path)
    message = str(error.value)
    assert "model: checkpoint has 'resnet20', this run has 'resnet32'" in message
    assert "num_branches: checkpoint has 3, this run has 2" in message
    assert "world_size: checkpoint has 4, this run has 2" in message
    assert "num_classes" not in message
    ckpt.check_compatible(saved, dict(saved), tmp_path)  # an equal layout passes


def test_random_states_round_trip_through_safe_load(tmp_path):
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "rank-0.pt"
    ckpt.atomic_save(ckpt.random_states(), path)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_random_states(ckpt.load_file(path))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
