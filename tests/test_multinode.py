"""Two torchrun agents on one machine as two nodes of one run: W=4 (two processes per
node), d=2. Each branch group must lie inside one node, each peer group across both,
and every rank must end with the same consensus."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import free_port
from launch import REPO, TORCHRUN, quick_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

NODE_NAMES = ("node-a", "node-b")


def can_set_host_name() -> bool:
    """Whether ``unshare --uts`` may give a child process its own host name (root, or a
    kernel that allows user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--uts", "--map-root-user", "hostname", "probe"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return probe.returncode == 0


def start_node(name: str, port: int, run_id: str, overrides: list[str], log_path: Path,
               own_host_name: bool) -> subprocess.Popen:
    """Start one torchrun agent, the node ``name``, joining the c10d rendezvous on loopback."""
    torchrun = [
        str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
        # Each agent would otherwise publish its host name as its address, and the
        # made-up names below resolve nowhere.
        "--local-addr", "127.0.0.1",
        "-m", "lookaround_dist.cli.train", "--config", "configs/demo.yaml", *overrides,
    ]
    if own_host_name:
        # A new UTS namespace changes the host name that the trainer reads
        # (socket.gethostname) for this agent and its workers only.
        command = ["unshare", "--uts", "--map-root-user", "sh", "-c",
                   f'hostname {name} && exec "$@"', "sh", *torchrun]
    else:
        command = torchrun
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)


def read_epoch_records(run_dir: Path) -> list[dict]:
    """The per-epoch records of metrics.jsonl (it may contain other kinds of records too)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if "train_loss" in record]


def test_two_nodes_share_one_consensus(tmp_path, demo_data):
    run_dir = tmp_path / "run"
    # Five steps with k = 3: one full round, then the epoch ends on a shorter one.
    overrides = quick_overrides(run_dir, **{
        "train.epochs": 1, "train.max_steps_per_epoch": 5, "data.batch_size": 16,
        "data.num_workers": 0, "data.eval_batch_size": 125,
    })
    own_host_name = can_set_host_name()
    port, run_id = free_port(), f"multinode-{uuid.uuid4().hex[:8]}"
    logs = [tmp_path / f"{name}.log" for name in NODE_NAMES]
    nodes = [start_node(name, port, run_id, overrides, log, own_host_name)
             for name, log in zip(NODE_NAMES, logs)]
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait(30)
    outputs = [log.read_text(errors="replace") for log in logs]
    for name, code, output in zip(NODE_NAMES, codes, outputs):
        assert code == 0, f"{name} exited {code}:\n{output[-3000:]}"
    output = "".join(outputs)

    # Layout: rank 0 prints the start-up summary, with the host of every rank.
    assert "world size W=4, branches d=2, k=3, 2 rank(s) per branch" in output
    assert "branch 0: augmentation hflip, ranks [0, 1] on " in output
    assert "branch 1: augmentation vflip, ranks [2, 3] on " in output
    assert "spans nodes" not in output
    if own_host_name:
        hosts = {line.rsplit(" on ", 1)[1].strip() for line in output.splitlines()
                 if "augmentation" in line and " on " in line}
        # Each branch group runs on one host and the two hosts differ, so the peer
        # groups {0, 2} and {1, 3} cross nodes.
        assert hosts == set(NODE_NAMES), hosts

    # The consensus: every rank hashes its own copy at the end of the run and the run
    # fails unless all four digests agree; rank 0 logs the agreement.
    assert re.search(r"consensus digest [0-9a-f]{16} identical on all 4 ranks", output), output[-3000:]
    metrics = read_epoch_records(run_dir)
    assert [record["epoch"] for record in metrics] == [0]
    assert (run_dir / "consensus.pt").is_file()
