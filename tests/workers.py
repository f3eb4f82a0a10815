"""Functions that run inside the spawned ranks of multi-process tests."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def init_group(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))


def small_net(num_classes: int = 4) -> nn.Module:
    """A tiny CNN with BatchNorm: parameters, float buffers and an integer buffer."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


def branch_batch(branch: int, step: int, position: int = 0, batch: int = 8):
    """Data that depends on the branch, the step and the position only (not on the layout)."""
    generator = torch.Generator().manual_seed(1000 * branch + 10 * step + position)
    return torch.randn(batch, 3, 8, 8, generator=generator), torch.randint(0, 4, (batch,), generator=generator)


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_round(lookaround, steps: int) -> None:
    for step in range(steps):
        for branch in lookaround.branches:
            images, labels = branch_batch(branch.index, step, lookaround.topology.position)
            loss = nn.functional.cross_entropy(branch.model(images), labels)
            branch.optimizer.zero_grad()
            loss.backward()
            branch.optimizer.step()


def average_worker(rank, world_size, port, out_dir, num_branches, steps, seed_per_rank=True,
                   memory_format="contiguous", average_optimizer_state=False):
    """Train one round without averaging, record every state, then average and record again."""
    from lookaround_dist import Lookaround, Topology

    init_group(rank, world_size, port)
    torch.manual_seed(rank if seed_per_rank else 0)  # per-rank seeds must not matter
    topology = Topology.create(num_branches)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    lookaround = Lookaround(small_net, topology, k=steps + 1, memory_format=fmt,
                            average_optimizer_state=average_optimizer_state)
    start = {b.index: snapshot(b.module) for b in lookaround.branches}
    for branch in lookaround.branches:
        branch.optimizer = torch.optim.SGD(branch.module.parameters(), lr=0.1, momentum=0.9)
    train_round(lookaround, steps)
    before = {b.index: snapshot(b.module) for b in lookaround.branches}
    stats = lookaround.average()
    after = {b.index: snapshot(b.module) for b in lookaround.branches}
    momentum = {b.index: [s["momentum_buffer"].clone() for s in b.optimizer.state.values()]
                for b in lookaround.branches}
    strides = {b.index: b.module[0].weight.stride() for b in lookaround.branches}
    unchecked = lookaround.average(check_integers=False).collectives
    torch.save({"start": start, "before": before, "after": after, "collectives": stats.collectives,
                "collectives_unchecked": unchecked,
                "momentum": momentum, "strides": strides, "branches": list(topology.branch_indices)},
               Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def integer_mismatch_worker(rank, world_size, port, out_dir):
    """Rank 1 takes one extra BatchNorm step; the average step must refuse."""
    from lookaround_dist import AveragingError, Lookaround, Topology

    init_group(rank, world_size, port)
    topology = Topology.create(2)
    lookaround = Lookaround(small_net, topology, k=1)
    if rank == 1:
        lookaround.branches[0].module(torch.randn(2, 3, 8, 8))
    message = ""
    try:
        lookaround.average()
    except AveragingError as error:
        message = str(error)
    torch.save({"message": message}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
