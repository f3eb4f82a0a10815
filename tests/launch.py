"""Starting lookaround-train under a real torchrun from tests, bounded by a timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun_train(nproc: int, overrides: list[str], timeout: float = 300.0, extra_args: list[str] = (),
                   config: str = "configs/demo.yaml", env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one training job; return the completed process (output in .stdout)."""
    return torchrun_module(nproc, "lookaround_dist.cli.train", ["--config", config, *extra_args, *overrides],
                           timeout=timeout, env=env)


def torchrun_module(nproc: int, module: str, arguments: list[str], timeout: float = 300.0,
                    env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module arguments`` under torchrun on ``nproc`` local processes."""
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), "-m", module, *arguments]
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


def start_torchrun(nproc: int, overrides: list[str], log_path: Path, extra_args: list[str] = (),
                   torchrun_args: list[str] = (), config: str = "configs/demo.yaml") -> subprocess.Popen:
    """Start one training job in the background, its output going to ``log_path``."""
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), *torchrun_args,
               "-m", "lookaround_dist.cli.train", "--config", config, *extra_args, *overrides]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)


def interrupt_after_checkpoint(nproc: int, overrides: list[str], log_path: Path, interrupt,
                               exit_timeout: float = 120.0, torchrun_args: list[str] = ()) -> tuple[int, str]:
    """Start a training job, call ``interrupt(job)`` once it saved its first checkpoint, then wait.

    Returns the torchrun agent's exit code and the job's whole output. The job is killed
    if it has not exited within ``exit_timeout`` seconds of the interruption.
    """
    job = start_torchrun(nproc, overrides, log_path, torchrun_args=torchrun_args)
    try:
        wait_for_output(job, log_path, "checkpoint saved", timeout=180)
        interrupt(job)
        agent_code = job.wait(exit_timeout)
    finally:
        stop_job(job)
    return agent_code, Path(log_path).read_text()


def wait_for_output(process: subprocess.Popen, log_path: Path, text: str, timeout: float) -> str:
    """Wait until ``text`` appears in the job's output; return the output so far.

    Raises AssertionError when the job exits or ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = Path(log_path).read_text(errors="replace")
        if text in output:
            return output
        if process.poll() is not None:
            raise AssertionError(f"the job exited ({process.returncode}) before printing {text!r}:\n{output[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not printed within {timeout} s:\n{Path(log_path).read_text()[-3000:]}")


def worker_pids(agent_pid: int) -> dict[int, int]:
    """The training processes that torchrun ``agent_pid`` started, by global rank (Linux /proc)."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != agent_pid:
                continue
            environment = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # the process ended while being read
        for variable in environment:
            if variable.startswith(b"RANK="):
                workers[int(variable[5:])] = int(entry.name)
    return workers


def stop_job(process: subprocess.Popen) -> None:
    """Kill a job that a test left running, with every process it started."""
    if process.poll() is None:
        for pid in worker_pids(process.pid).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
    process.wait(30)
