"""Shared fixtures: real gloo process groups on loopback, each bounded by a timeout."""

from __future__ import annotations

import multiprocessing
import socket
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_DATA = REPO / "demo" / "cifar10"

# Spawned children import worker functions from this folder.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_group(target, world_size: int, out_dir: Path, timeout: float = 120.0, **kwargs) -> list:
    """Run ``target(rank, world_size, port, out_dir, **kwargs)`` in ``world_size`` spawned
    processes that form one gloo group; return each rank's saved result.

    Fails (and kills every process) when any rank exits non-zero or the group does not
    finish within ``timeout`` seconds.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(target=target, args=(rank, world_size, port, str(out_dir)), kwargs=kwargs)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(timeout)
        hung = [rank for rank, p in enumerate(processes) if p.is_alive()]
        if hung:
            pytest.fail(f"ranks {hung} did not finish within {timeout} s")
        failed = {rank: p.exitcode for rank, p in enumerate(processes) if p.exitcode != 0}
        if failed:
            pytest.fail(f"ranks exited with errors: {failed}")
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


@pytest.fixture
def demo_data() -> Path:
    if not DEMO_DATA.is_dir():
        pytest.skip(f"the demo subset is missing at {DEMO_DATA}")
    return DEMO_DATA
