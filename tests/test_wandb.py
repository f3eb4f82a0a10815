"""wandb tracking: offline runs through torchrun, resume, disabled mode, and failures that
must not stop training. wandb never goes online here: every run sets WANDB_MODE."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from launch import quick_overrides, torchrun_train
from lookaround_dist.config import load_config
from lookaround_dist.tracking import Tracker, flatten_lists

# Three steps per epoch, no validation set: a step line at every second step, and
# stop_after_steps=4 lands inside the second epoch.
WANDB_OPTIONS = {
    "train.epochs": 2, "train.max_steps_per_epoch": 3, "lookaround.k": 2,
    "train.log_interval_steps": 2, "data.num_workers": 0, "data.val_path": "''",
    "wandb.enabled": "true", "wandb.project": "lookaround-test", "wandb.name": "wandb-test",
    "wandb.tags": "[cpu,test]",
}
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}

# Framing of a .wandb file (a LevelDB-style log): a 7-byte file header, then 32 KiB
# blocks of chunks, each chunk a 7-byte header (CRC32, length, type) and its payload.
# Records longer than a block are split into FIRST, MIDDLE and LAST chunks.
WANDB_FILE_HEADER = 7
BLOCK_BYTES = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every record of an offline run's ``.wandb`` file as wandb's own protobuf message.

    wandb 0.31 ships no Python reader for this file (its Go core writes and reads it),
    so the framing is undone here and each payload parsed with wandb's ``Record`` type.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file: it starts with {data[:7]!r}"
    records, pending, position = [], b"", WANDB_FILE_HEADER
    while position + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK_BYTES - position % BLOCK_BYTES
        if left_in_block < CHUNK_HEADER:  # the writer pads the tail of a block
            position += left_in_block
            continue
        block_end = position + left_in_block
        _, length, kind = struct.unpack("<IHB", data[position:position + CHUNK_HEADER])
        payload = data[position + CHUNK_HEADER:position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        if kind in (FIRST, MIDDLE):
            pending = payload if kind == FIRST else pending + payload
            continue
        if kind == LAST:
            payload, pending = pending + payload, b""
        elif kind != FULL:  # zero padding up to the end of the block
            position = block_end
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def read_offline_run(run_folder: Path) -> dict:
    """The run record, the config and the history rows of one offline run folder."""
    (wandb_file,) = run_folder.glob("run-*.wandb")
    def key_of(item) -> str:  # wandb stores some keys whole and others split at "/"
        return item.key or "/".join(item.nested_key)

    result = {"run": None, "config": {}, "history": []}
    for record in wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            result["run"] = record.run
            result["config"].update({key_of(item): json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            result["config"].update({key_of(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            result["history"].append({key_of(item): json.loads(item.value_json) for item in record.history.item})
    return result


def offline_runs(folder: Path) -> list[Path]:
    return sorted((folder / "wandb").glob("offline-run-*"))


def epoch_rows(history: list[dict]) -> list[dict]:
    return [row for row in history if "images_per_second" in row]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> dict:
    """A W=2 run with wandb offline, stopped by train.stop_after_steps=4 inside epoch 1."""
    if not (Path(__file__).resolve().parents[1] / "demo" / "cifar10").is_dir():
        pytest.skip("the demo subset is missing")
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    overrides = quick_overrides(run_dir, **WANDB_OPTIONS, **{"train.stop_after_steps": 4})
    result = torchrun_train(2, overrides, timeout=240, env=OFFLINE)
    assert result.returncode == 0, result.stdout[-3000:]
    return {"run_dir": run_dir, "stdout": result.stdout, "offline_runs": offline_runs(run_dir)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_offline_run_from_rank_zero(stopped_run):
    run_dir = stopped_run["run_dir"]
    folders = stopped_run["offline_runs"]
    assert len(folders) == 1, f"expected one offline run (rank 0's), found {folders}"
    logged = read_offline_run(folders[0])

    assert logged["run"].project == "lookaround-test"
    assert logged["run"].display_name == "wandb-test"
    assert sorted(logged["run"].tags) == ["cpu", "test"]
    assert logged["config"]["lookaround"]["num_branches"] == 2
    assert logged["config"]["train"]["stop_after_steps"] == 4

    epochs = epoch_rows(logged["history"])
    assert [row["epoch"] for row in epochs] == [0]
    assert epochs[0]["global_step"] == 3
    assert set(epochs[0]) >= {"train_loss_branch_0", "train_loss_branch_1", "lr", "average_ms_per_round"}
    step_rows = [row for row in logged["history"] if "step/lr" in row]
    assert [row["global_step"] for row in step_rows] == [2, 4]

    meta = torch.load(sorted((run_dir / "checkpoints").iterdir())[-1] / "meta.pt", weights_only=False)
    assert folders[0].name.endswith(f"-{meta['wandb_id']}")
    assert f"wandb: started run {meta['wandb_id']} in offline mode" in stopped_run["stdout"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resumed_run_keeps_wandb_id(stopped_run):
    run_dir = stopped_run["run_dir"]
    first_id = stopped_run["offline_runs"][0].name.rsplit("-", 1)[1]
    overrides = quick_overrides(run_dir, **WANDB_OPTIONS)
    resumed = torchrun_train(2, overrides, timeout=240, extra_args=["--resume"], env=OFFLINE)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"wandb: continuing run {first_id}" in resumed.stdout

    folders = offline_runs(run_dir)
    assert len(folders) == 2, folders
    assert {folder.name.rsplit("-", 1)[1] for folder in folders} == {first_id}
    second = read_offline_run(next(f for f in folders if f not in stopped_run["offline_runs"]))
    assert [row["epoch"] for row in epoch_rows(second["history"])] == [1]
    assert min(row["global_step"] for row in second["history"]) > 4


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_disabled_mode_runs_without_files(tmp_path, demo_data):
    run_dir = tmp_path / "run"
    result = torchrun_train(1, quick_overrides(run_dir, **{**WANDB_OPTIONS, "train.epochs": 1}),
                            timeout=150, env={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stdout[-3000:]
    assert "wandb: disabled" in result.stdout
    assert (run_dir / "consensus.pt").is_file()
    assert not (run_dir / "wandb").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_init_failure_logged_and_run_finishes(tmp_path, demo_data):
    # wandb 0.31 falls back to the system temp folder when WANDB_DIR itself is unusable.
    # A file where the wandb folder inside WANDB_DIR belongs makes init fail, even for root.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "wandb").write_text("a file where wandb expects its folder\n")
    run_dir = tmp_path / "run"
    result = torchrun_train(1, quick_overrides(run_dir, **{**WANDB_OPTIONS, "train.epochs": 1}),
                            timeout=150, env={**OFFLINE, "WANDB_DIR": str(blocked)})
    assert result.returncode == 0, result.stdout[-3000:]
    assert "wandb: init failed in offline mode" in result.stdout
    assert "NotADirectoryError" in result.stdout
    assert (run_dir / "consensus.pt").is_file()
    meta = torch.load(sorted((run_dir / "checkpoints").iterdir())[-1] / "meta.pt", weights_only=False)
    assert meta["wandb_id"] is None


# ----- the tracker alone, without torchrun ---------------------------------------------

class FailingRun:
    """A wandb run whose log call fails, as when the wandb-core process has died."""

    id = "failing"

    def __init__(self):
        self.finished_with = []

    def log(self, values):
        raise ConnectionResetError("wandb-core is gone")

    def finish(self, exit_code=None):
        self.finished_with.append(exit_code)


def test_logging_failure_turns_tracking_off(tmp_path, caplog):
    tracker = Tracker(load_config(), tmp_path, rank=0, run_id=None)  # wandb.enabled is false
    run = FailingRun()
    tracker.run = run
    tracker.log({"loss": 1.0}, step=7)
    assert not tracker.active
    assert run.finished_with == [1]
    assert "logging at step 7 failed" in caplog.text
    tracker.log({"loss": 0.5}, step=8)  # a no-op now
    tracker.finish()


def test_only_rank_zero_starts_wandb(tmp_path, monkeypatch):
    import wandb

    def reject_init(*args, **kwargs):
        raise AssertionError("wandb.init called on a rank other than 0")

    monkeypatch.setattr(wandb, "init", reject_init)
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = load_config(overrides=["wandb.enabled=true"])
    tracker = Tracker(config, tmp_path, rank=1, run_id="kept")
    assert not tracker.active
    assert tracker.run_id == "kept"


def test_per_branch_lists_become_keys():
    flat = flatten_lists({"epoch": 3, "train_loss": [0.5, 0.75]})
    assert flat == {"epoch": 3, "train_loss_branch_0": 0.5, "train_loss_branch_1": 0.75}
