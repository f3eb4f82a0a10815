"""Process-group set-up from torchrun's environment, device choice, named collectives and
teardown."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from typing import Iterator, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def env_world() -> tuple[int, int, int]:
    """Rank, local rank and world size from torchrun's environment (0, 0, 1 without it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def restart_count() -> int:
    """Return how often torchrun has restarted this run's workers (TORCHELASTIC_RESTART_COUNT, 0 without it)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def select_device(requested: str, local_rank: int) -> torch.device:
    """Return the device of this process: the GPU of its LOCAL_RANK, or the CPU."""
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
    timeout = datetime.timedelta(seconds=timeout_seconds)
    options = {"backend": backend, "timeout": timeout}
    if device.type == "cuda":
        options["device_id"] = device
    if restart_count() > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun (torch 2.14) keeps one store for all restarts and the process group's
        # keys carry no restart number, so restarted workers could read the addresses of
        # the workers that died and fail to connect or hang. A prefix per restart avoids it.
        rank, _, world_size = env_world()
        agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                    world_size, is_master=False, timeout=timeout)
        options.update(store=dist.PrefixStore(f"lookaround/restart-{restart_count()}", agent_store),
                       rank=rank, world_size=world_size)
    dist.init_process_group(**options)


def gather_hosts() -> list[str]:
    """Return the host name of every rank, indexed by rank."""
    host = socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()):
        return [host]
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, host)
    return hosts


class CollectiveError(RuntimeError):
    """A collective that failed or timed out, with the stage of the run it belonged to."""


_STAGE_KEY = "lookaround/stage/{rank}"
_stage_count = 0


def _default_store():
    # NOTE: a private helper of torch.distributed (present in torch 2.14); without it the
    # error of a failed collective cannot name the ranks that had not reached it.
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    return getter() if getter is not None else None


def _lagging_ranks(count: int, wait_seconds: float = 5.0) -> Optional[list[int]]:
    """Ranks whose latest named collective started before this rank's ``count``-th one,
    read from the process group's key-value store; None when the store is unreachable."""
    try:
        store = _default_store()
        if store is None:
            return None
        store.set_timeout(datetime.timedelta(seconds=wait_seconds))
        lagging = []
        for rank in range(dist.get_world_size()):
            key = _STAGE_KEY.format(rank=rank)
            if not store.check([key]) or int(store.get(key).split(b" ", 1)[0]) < count:
                lagging.append(rank)
        return lagging
    except (RuntimeError, ValueError):  # the store host may be gone as well
        return None


@contextlib.contextmanager
def collective(operation: str) -> Iterator[None]:
    """Run the collectives inside the block as the named stage ``operation``.

    Each rank records in the process group's store that it reached the stage (one small
    write). When a collective inside fails, most often because the process-group timeout
    (train.timeout_seconds) ran out while a rank was dead or stuck, the error names the
    stage and the ranks that had not reached it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    global _stage_count
    _stage_count += 1
    count = _stage_count
    rank = dist.get_rank()
    try:
        store = _default_store()
        if store is not None:
            store.set(_STAGE_KEY.format(rank=rank), f"{count} {operation}")
    except RuntimeError as error:
        raise CollectiveError(f"{operation} failed on rank {rank}: the store of the process "
                              f"group is unreachable ({error})") from error
    try:
        yield
    except RuntimeError as error:  # gloo and NCCL raise RuntimeError subclasses
        lagging = _lagging_ranks(count)
        if lagging:
            where = f"rank(s) {lagging} had not reached it (dead or stuck)"
        elif lagging == []:
            where = "every rank had reached it, so a rank failed inside it"
        else:
            where = "which rank is missing is unknown"
        raise CollectiveError(
            f"{operation} failed on rank {rank}: {where}. A timeout here means that no rank "
            f"finished it within train.timeout_seconds. Cause: {error}"
        ) from error


def barrier(operation: str = "barrier") -> None:
    if dist.is_available() and dist.is_initialized():
        with collective(operation):
            dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
