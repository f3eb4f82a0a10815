"""Process-group set-up from torchrun's environment, device choice and teardown."""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def env_world() -> tuple[int, int, int]:
    """Rank, local rank and world size from torchrun's environment (0, 0, 1 without it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def select_device(requested: str, local_rank: int) -> torch.device:
    """The device of this process: the GPU of its LOCAL_RANK, or the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda was requested but CUDA is not available; use train.device=cpu")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                f"start at most that many processes per node"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(device: torch.device, timeout_seconds: float) -> None:
    """Join the process group torchrun set up: NCCL on CUDA, gloo on CPU."""
    _, _, world_size = env_world()
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        return  # a single process started without torchrun needs no group
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_seconds)}
    if device.type == "cuda":
        options["device_id"] = device
    dist.init_process_group(**options)


def gather_hosts() -> list[str]:
    """The host name of every rank, indexed by rank."""
    host = socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()):
        return [host]
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, host)
    return hosts


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
