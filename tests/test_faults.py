"""Faults injected into real runs: preemption signals, killed and stopped ranks, exact
resume (W=1 sequential, DALI) and the non-finite guard."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import run_group
from launch import (interrupt_after_checkpoint, quick_overrides, start_torchrun, stop_job, torchrun_train,
                    wait_for_output, worker_pids)

pytestmark = pytest.mark.slow

# Three epochs of six steps with k = 4: rounds end inside epochs and epochs end inside
# rounds. No validation set, to keep each run short.
FAULT_OPTIONS = {"train.epochs": 3, "train.max_steps_per_epoch": 6, "lookaround.k": 4,
                 "data.num_workers": 1, "data.val_path": "''"}


def assert_same_weights(expected_dir: Path, found_dir: Path) -> None:
    expected = torch.load(expected_dir / "consensus.pt", weights_only=True)
    found = torch.load(found_dir / "consensus.pt", weights_only=True)
    assert expected.keys() == found.keys()
    for name in expected:
        assert torch.equal(expected[name], found[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """An uninterrupted W=2, d=2 run, the reference for the interrupted ones."""
    if not (Path(__file__).resolve().parents[1] / "demo" / "cifar10").is_dir():
        pytest.skip("the demo subset is missing")
    run_dir = tmp_path_factory.mktemp("faults") / "whole"
    result = torchrun_train(2, quick_overrides(run_dir, **FAULT_OPTIONS), timeout=240)
    assert result.returncode == 0, result.stdout[-3000:]
    return run_dir


@pytest.mark.timeout(300)
def test_sigusr1_to_one_rank_stops_all(tmp_path, uninterrupted):
    """SIGUSR1 sent to rank 1 only: both ranks stop at one step, save and exit 85; the
    resumed run ends on the reference weights bitwise."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "first.log"
    agent_code, output = interrupt_after_checkpoint(
        2, quick_overrides(run_dir, **FAULT_OPTIONS), log_path,
        lambda job: os.kill(worker_pids(job.pid)[1], signal.SIGUSR1))
    assert "[rank 1] WARNING received SIGUSR1" in output
    assert "stopped by SIGUSR1" in output
    assert "stopped by a signal on another rank" in output
    # torchrun's failure report lists each rank. The first rank to exit 85 makes torchrun
    # stop the other with SIGTERM, which may land while that rank still shuts down; by then
    # it has saved, because every rank leaves the save only after its final barrier.
    assert output.count("exitcode  : 85") >= 1, output[-3000:]
    assert output.count("exitcode  : 85") + output.count("exitcode  : -15") == 2, output[-3000:]
    # torchrun reports any non-zero worker exit as a failure of its own: exit code 1.
    assert agent_code == 1
    steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").iterdir())
    assert 6 < steps[-1] < 18, steps

    resumed = torchrun_train(2, quick_overrides(run_dir, **FAULT_OPTIONS), extra_args=["--resume"], timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"step {steps[-1]}" in resumed.stdout
    assert_same_weights(uninterrupted, run_dir)


@pytest.mark.timeout(300)
def test_sigterm_to_torchrun_saves_and_exits(tmp_path):
    """SIGTERM to the torchrun agent reaches every worker, which save a checkpoint and exit 85."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "job.log"
    agent_code, output = interrupt_after_checkpoint(
        2, quick_overrides(run_dir, **FAULT_OPTIONS), log_path, lambda job: job.send_signal(signal.SIGTERM))
    assert output.count("stopped by SIGTERM") == 2, output[-3000:]
    assert "DataLoader worker" not in output  # the loader's worker processes survive the signal
    # torchrun re-raises the signal as an exception after its workers exit: exit code 1.
    assert agent_code == 1, output[-3000:]
    steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").iterdir())
    assert 6 < steps[-1] < 18, steps
    assert not (run_dir / "consensus.pt").exists()


@pytest.mark.timeout(300)
def test_killed_rank_restarts_from_checkpoint(tmp_path, uninterrupted):
    """SIGKILL of rank 1 under --max-restarts 1: torchrun restarts the workers, which resume
    on their own and end on the reference weights bitwise."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "job.log"
    agent_code, output = interrupt_after_checkpoint(
        2, quick_overrides(run_dir, **FAULT_OPTIONS), log_path,
        lambda job: os.kill(worker_pids(job.pid)[1], signal.SIGKILL),
        exit_timeout=240, torchrun_args=["--max-restarts", "1", "--monitor-interval", "0.2"])
    assert agent_code == 0, output[-3000:]
    assert "torchrun restart 1: resuming from the latest checkpoint" in output
    assert "resumed from" in output
    assert_same_weights(uninterrupted, run_dir)


@pytest.mark.timeout(240)
def test_stopped_rank_fails_others_in_time(tmp_path):
    """Rank 1 frozen with SIGSTOP: rank 0 fails within train.timeout_seconds plus a margin,
    naming the operation and the missing rank."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "job.log"
    timeout_seconds = 8
    options = dict(FAULT_OPTIONS, **{"train.timeout_seconds": timeout_seconds, "train.epochs": 20})
    job = start_torchrun(2, quick_overrides(run_dir, **options), log_path)
    stopped_pid = None
    try:
        wait_for_output(job, log_path, "checkpoint saved", timeout=180)
        stopped_pid = worker_pids(job.pid)[1]
        os.kill(stopped_pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        output = wait_for_output(job, log_path, "failed on rank 0", timeout=timeout_seconds + 60)
        elapsed = time.monotonic() - frozen_at
    finally:
        if stopped_pid is not None:
            os.kill(stopped_pid, signal.SIGKILL)
        stop_job(job)
    # At most one round of training before rank 0 waits, then the timeout.
    assert elapsed < timeout_seconds + 20, elapsed
    assert "rank(s) [1] had not reached it" in output, output[-3000:]
    assert "average step" in output or "agreement" in output or "checkpoint barrier" in output


@pytest.mark.timeout(300)
def test_sequential_branches_resume_bitwise(tmp_path, demo_data):
    """W=1 hosting d=2 branches, stopped inside a round and resumed: same final weights."""
    options = dict(FAULT_OPTIONS, **{"train.epochs": 2})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert torchrun_train(1, quick_overrides(whole, **options), timeout=240).returncode == 0
    stopped = torchrun_train(1, quick_overrides(parts, **options, **{"train.stop_after_steps": 5}), timeout=240)
    assert stopped.returncode == 0, stopped.stdout[-3000:]
    resumed = torchrun_train(1, quick_overrides(parts, **options), extra_args=["--resume"], timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_weights(whole, parts)


@pytest.mark.timeout(420)
def test_dali_backend_resume_bitwise(tmp_path, demo_data):
    """The DALI backend (CPU operators) stopped mid-epoch and resumed: same final weights."""
    pytest.importorskip("nvidia.dali")
    options = dict(FAULT_OPTIONS, **{"train.epochs": 2, "data.backend": "dali"})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    first = torchrun_train(2, quick_overrides(whole, **options), timeout=300)
    assert first.returncode == 0, first.stdout[-3000:]
    stopped = torchrun_train(2, quick_overrides(parts, **options, **{"train.stop_after_steps": 5}), timeout=300)
    assert stopped.returncode == 0, stopped.stdout[-3000:]
    resumed = torchrun_train(2, quick_overrides(parts, **options), extra_args=["--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_weights(whole, parts)


# ----- the non-finite guard, on a trainer in this process (W=1 hosting d=2) -------------

def build_trainer(tmp_path, policy: str, monkeypatch):
    from lookaround_dist.config import load_config
    from lookaround_dist.trainer import Trainer

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    overrides = quick_overrides(tmp_path / "run", **dict(FAULT_OPTIONS, **{
        "train.nonfinite_policy": policy, "train.epochs": 1, "data.num_workers": 0,
        "data.batch_size": 8, "train.threads_per_rank": 1}))
    return Trainer(load_config("configs/demo.yaml", overrides))


def inject_nan(trainer, step: int, branch: int) -> None:
    """Fill the first weight of ``branch`` with NaN after optimizer step ``step``."""
    original = trainer._train_step

    def step_then_inject(batches):
        original(batches)
        if trainer.progress.global_step + 1 == step:
            for hosted in trainer.lookaround.branches:
                if hosted.index == branch:
                    next(hosted.module.parameters()).data.fill_(float("nan"))

    trainer._train_step = step_then_inject


def all_finite(module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


@pytest.mark.timeout(120)
def test_nonfinite_stop_raises_and_saves_nothing(tmp_path, demo_data, monkeypatch):
    from lookaround_dist.trainer import NonFiniteError

    trainer = build_trainer(tmp_path, "stop", monkeypatch)
    inject_nan(trainer, step=2, branch=1)
    try:
        with pytest.raises(NonFiniteError, match=r"branch\(es\) \[1\] at epoch 0, step 4"):
            trainer.run()
    finally:
        trainer.close()
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.timeout(120)
def test_nonfinite_skip_averages_healthy_branch(tmp_path, demo_data, monkeypatch, caplog):
    trainer = build_trainer(tmp_path, "skip", monkeypatch)
    inject_nan(trainer, step=2, branch=1)
    try:
        assert trainer.run() == 0
    finally:
        trainer.close()
    assert "non-finite weights in branch(es) [1] at epoch 0, step 4: averaging the other branches" in caplog.text
    assert all_finite(trainer.lookaround.consensus)
    assert (tmp_path / "run" / "consensus.pt").is_file()


@pytest.mark.timeout(120)
def test_nonfinite_rollback_restores_consensus(tmp_path, demo_data, monkeypatch, caplog):
    trainer = build_trainer(tmp_path, "rollback", monkeypatch)
    inject_nan(trainer, step=6, branch=0)  # in the second round, after one consensus was kept
    try:
        assert trainer.run() == 0
    finally:
        trainer.close()
    assert "rolling back to the last consensus" in caplog.text
    assert all_finite(trainer.lookaround.consensus)


@pytest.mark.timeout(120)
def test_checkpoint_of_nonfinite_weights_refused(tmp_path, demo_data, monkeypatch):
    from lookaround_dist.trainer import NonFiniteError

    trainer = build_trainer(tmp_path, "stop", monkeypatch)
    try:
        trainer.save_checkpoint()
        next(trainer.lookaround.branches[1].module.buffers()).fill_(float("inf"))
        trainer.progress.global_step = 3
        with pytest.raises(NonFiniteError, match=r"step 3 not saved: branch\(es\) \[1\]"):
            trainer.save_checkpoint()
    finally:
        trainer.close()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000000000"]


def nonfinite_skip_worker(rank, world_size, port, out_dir):
    """Only rank 1 has the NaN; both ranks must skip the same branch and agree."""
    import pytest as _pytest

    monkeypatch = _pytest.MonkeyPatch()
    out = Path(out_dir)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    from lookaround_dist.config import load_config
    from lookaround_dist.trainer import Trainer

    overrides = quick_overrides(out / "run", **dict(FAULT_OPTIONS, **{
        "train.nonfinite_policy": "skip", "train.epochs": 1, "data.num_workers": 0,
        "data.batch_size": 8, "train.threads_per_rank": 1}))
    import os as _os
    _os.chdir(Path(__file__).resolve().parents[1])
    trainer = Trainer(load_config("configs/demo.yaml", overrides))
    inject_nan(trainer, step=2, branch=1)
    code = trainer.run()
    trainer.close()
    torch.save({"code": code, "weights": {k: v.clone() for k, v in trainer.lookaround.consensus.state_dict().items()}},
               out / f"rank{rank}.pt")


@pytest.mark.timeout(180)
def test_nonfinite_skip_agreed_across_ranks(tmp_path, demo_data):
    results = run_group(nonfinite_skip_worker, 2, tmp_path, timeout=150)
    assert [r["code"] for r in results] == [0, 0]
    for name, value in results[0]["weights"].items():
        assert torch.equal(value, results[1]["weights"][name]), name
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name
