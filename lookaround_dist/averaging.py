"""The average step: coalesced averaging of all branches' parameters and buffers.

Floating-point parameters and floating-point buffers are packed into persistent flat
buffers, one per (kind, dtype, device), allocated once. The integer check has its own
persistent buffers too, so a round allocates no tensor storage. Each tensor's view into its
flat buffer has the tensor's own strides, so packing a channels-last tensor is a copy in
memory order.
Each flat buffer is summed by one all-reduce, divided, and copied back into the modules'
own tensors, so optimizers and DDP keep their references and channels-last tensors keep
their memory format.

* Parameters are reduced over the peer group (one rank per branch at the same position)
  after a local sum of the branches this rank hosts, and divided by the number of
  branches. The ranks inside a branch hold bitwise equal parameters (DDP), so every peer
  group computes the same mean.
* Floating-point buffers (BatchNorm running statistics) are reduced over the whole world
  and divided by the number of contributions. Ranks of one branch update their running
  statistics from different samples, so their buffers differ inside a round; averaging
  them over every rank makes all ranks agree and uses the statistics of every rank.
* Integer buffers (BatchNorm's ``num_batches_tracked``) are counters, not estimates: an
  average of counters is meaningless, so they are checked to agree across all ranks and
  left as they are.

Sums go through ``ReduceOp.SUM`` and an explicit division because ``ReduceOp.AVG`` is
NCCL-only and unreliable on gloo.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .topology import Topology


class AveragingError(RuntimeError):
    """Branches that cannot be averaged (integer buffers that disagree, shapes that differ)."""


@dataclasses.dataclass
class Bucket:
    """One flat buffer and, per hosted branch, the tensors it is packed from."""

    flat: torch.Tensor
    views: list[torch.Tensor]
    tensors: list[list[torch.Tensor]]
    """``tensors[h][i]`` is tensor ``i`` of hosted branch ``h``."""


def _bucket_key(tensor: torch.Tensor) -> tuple:
    return (tensor.dtype, tensor.device)


def dense_view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """Return a view of ``flat`` from ``offset`` with the shape and strides of ``like``.

    ``empty_like`` keeps the strides of a dense tensor (channels-last included), so the
    copies between a module's tensor and its view run in memory order instead of
    permuting every element.
    """
    strides = torch.empty_like(like, device="meta").stride()
    return torch.as_strided(flat, like.shape, strides, flat.storage_offset() + offset)


def build_buckets(per_branch: list[list[torch.Tensor]]) -> list[Bucket]:
    """Group tensors by dtype and device into flat buffers shaped for ``per_branch[0]``."""
    first = per_branch[0]
    for tensors in per_branch[1:]:
        if [t.shape for t in tensors] != [t.shape for t in first]:
            raise AveragingError("hosted branches have tensors of different shapes")
    groups: dict[tuple, list[int]] = {}
    for i, tensor in enumerate(first):
        groups.setdefault(_bucket_key(tensor), []).append(i)
    buckets = []
    for (dtype, device), indices in groups.items():
        total = sum(first[i].numel() for i in indices)
        flat = torch.empty(total, dtype=dtype, device=device)
        views, offset = [], 0
        for i in indices:
            views.append(dense_view(flat, offset, first[i]))
            offset += first[i].numel()
        tensors = [[branch[i] for i in indices] for branch in per_branch]
        buckets.append(Bucket(flat, views, tensors))
    return buckets


def split_state(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Return a module's floating-point parameters, floating-point buffers and integer buffers."""
    params = [p.data for p in module.parameters() if p.is_floating_point()]
    float_buffers, int_buffers = [], []
    for buffer in module.buffers():
        (float_buffers if buffer.is_floating_point() else int_buffers).append(buffer)
    return params, float_buffers, int_buffers


def optimizer_float_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Return the optimizer's floating-point state tensors (momentum, Adam moments) in a fixed order."""
    tensors = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for name in sorted(state):
                value = state[name]
                if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                    tensors.append(value)
    return tensors


@dataclasses.dataclass
class AverageStats:
    """Cost of the last average step."""

    milliseconds: float = 0.0
    bytes_reduced: int = 0
    collectives: int = 0


class BranchAverager:
    """Averages the hosted branches of every rank into one consensus.

    ``modules`` are the (unwrapped) models of the branches this rank hosts, in the order
    of ``topology.branch_indices``. They must share one architecture.
    """

    def __init__(self, modules: Sequence[nn.Module], topology: Topology):
        if len(modules) != topology.branches_per_rank:
            raise AveragingError(
                f"expected {topology.branches_per_rank} hosted branches, found {len(modules)}"
            )
        self.topology = topology
        self.modules = list(modules)
        states = [split_state(m) for m in self.modules]
        if topology.ranks_per_branch == 1:
            # With one rank per branch the peer group spans the world and both divisors are
            # the number of branches, so parameters and buffers share flat buffers and one
            # all-reduce per dtype carries both.
            self.param_buckets = build_buckets([s[0] + s[1] for s in states])
            self.buffer_buckets = []
        else:
            self.param_buckets = build_buckets([s[0] for s in states])
            self.buffer_buckets = build_buckets([s[1] for s in states]) if states[0][1] else []
        self.int_tensors = [s[2] for s in states]
        self._build_integer_buffers()
        self.optimizer_buckets: Optional[list[Bucket]] = None
        self.stats = AverageStats()

    def _device(self) -> torch.device:
        return self.param_buckets[0].flat.device

    def _build_integer_buffers(self) -> None:
        """Allocate the int64 buffers of the integer check once, so a round allocates none.

        ``int_flat`` contains this rank's values and their negation, so one MAX all-reduce
        over it gives the maximum and (negated) the minimum over all ranks.
        """
        device = self._device()
        count = sum(t.numel() for t in self.int_tensors[0])
        self.int_flat = torch.empty(2 * count, dtype=torch.int64, device=device)
        self.int_local = torch.empty(count, dtype=torch.int64, device=device)
        self.int_local_negated = torch.empty(count, dtype=torch.int64, device=device)
        self.int_other = torch.empty(count if len(self.int_tensors) > 1 else 0, dtype=torch.int64, device=device)
        self.int_local_views = self._int_views(self.int_local)
        self.int_other_views = self._int_views(self.int_other) if len(self.int_tensors) > 1 else []
        self.int_max, self.int_negated_min = self.int_flat[:count], self.int_flat[count:]

    def _int_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        views, offset = [], 0
        for tensor in self.int_tensors[0]:
            views.append(flat[offset: offset + tensor.numel()].view(tensor.shape))
            offset += tensor.numel()
        return views

    # ----- collectives ---------------------------------------------------------------
    def _start_all_reduce(self, tensor: torch.Tensor, group, op=dist.ReduceOp.SUM):
        """Start an all-reduce of ``tensor``; return its work handle, or None without a process group."""
        if not self.topology.distributed:
            return None
        self.stats.collectives += 1
        self.stats.bytes_reduced += tensor.numel() * tensor.element_size()
        return dist.all_reduce(tensor, op=op, group=group, async_op=True)

    @staticmethod
    def _pack_bucket(bucket: Bucket, contributes: Sequence[bool]) -> None:
        """Sum the contributing hosted branches into the flat buffer."""
        contributors = [h for h, keep in enumerate(contributes) if keep]
        if contributors:
            torch._foreach_copy_(bucket.views, bucket.tensors[contributors[0]])
            for h in contributors[1:]:
                torch._foreach_add_(bucket.views, bucket.tensors[h])
        else:
            bucket.flat.zero_()

    @staticmethod
    def _unpack_bucket(bucket: Bucket, divisor: float) -> None:
        """Divide the reduced flat buffer and copy it into every hosted branch's tensors."""
        bucket.flat.div_(divisor)
        for tensors in bucket.tensors:
            torch._foreach_copy_(tensors, bucket.views)

    # ----- public --------------------------------------------------------------------
    def average(self, optimizers: Optional[Sequence[torch.optim.Optimizer]] = None,
                healthy: Optional[Sequence[bool]] = None, check_integers: bool = True) -> AverageStats:
        """Average every hosted branch into the consensus, in place.

        ``optimizers``, when given, also have their floating-point state averaged.
        ``healthy`` (one flag per global branch, equal on every rank) leaves unhealthy
        branches out of the mean; they receive the consensus like the others.
        ``check_integers=False`` skips the integer-buffer check and its collective; a loop
        that averages often can check once per epoch instead.
        """
        started = time.perf_counter()
        self.stats = AverageStats()
        topology = self.topology
        branches = topology.branch_indices
        healthy = list(healthy) if healthy is not None else [True] * topology.num_branches
        num_healthy = sum(healthy)
        if num_healthy == 0:
            raise AveragingError("no healthy branch is left to average")
        contributes = [healthy[b] for b in branches]

        # Every collective starts before the first is waited on, so that their latencies
        # overlap. Every rank starts them in the same order.
        integer_work = self._start_integer_check() if check_integers else None
        pending = []
        for bucket in self.param_buckets:
            pending.append((bucket, topology.peer_group, num_healthy))
        # Each branch's buffers arrive once from each of its ranks.
        buffer_divisor = num_healthy * topology.ranks_per_branch
        for bucket in self.buffer_buckets:
            pending.append((bucket, topology.world_group, buffer_divisor))
        if optimizers is not None:
            for bucket in self._optimizer_buckets(optimizers):
                pending.append((bucket, topology.peer_group, num_healthy))
        works = []
        for bucket, group, _ in pending:
            self._pack_bucket(bucket, contributes)
            works.append(self._start_all_reduce(bucket.flat, group))

        for work in works + [integer_work]:
            if work is not None:
                work.wait()
        # The module tensors are written only after the integer check passed, so a failed
        # check leaves every branch as it was.
        if check_integers:
            self._finish_integer_check()
        for bucket, _, divisor in pending:
            self._unpack_bucket(bucket, divisor)

        if self._device().type == "cuda":
            torch.cuda.current_stream().synchronize()  # so that the timing covers the work
        self.stats.milliseconds = (time.perf_counter() - started) * 1000.0
        return self.stats

    def check_integer_buffers(self) -> None:
        """Raise :class:`AveragingError` unless integer buffers agree on every branch and rank."""
        work = self._start_integer_check()
        if work is not None:
            work.wait()
        self._finish_integer_check()

    def _start_integer_check(self):
        """Compare the hosted branches' integer buffers and start the MAX all-reduce over all ranks."""
        if not self.int_tensors[0]:
            return None
        local = self.int_local
        torch._foreach_copy_(self.int_local_views, self.int_tensors[0])
        for h, tensors in enumerate(self.int_tensors[1:], start=1):
            torch._foreach_copy_(self.int_other_views, tensors)
            if not torch.equal(local, self.int_other):
                raise AveragingError(
                    f"integer buffers differ between hosted branches {self.topology.branch_indices[0]} "
                    f"and {self.topology.branch_indices[h]}"
                )
        torch.neg(local, out=self.int_local_negated)
        self.int_max.copy_(local)
        self.int_negated_min.copy_(self.int_local_negated)
        return self._start_all_reduce(self.int_flat, self.topology.world_group, op=dist.ReduceOp.MAX)

    def _finish_integer_check(self) -> None:
        """Raise unless the reduced maximum and minimum equal this rank's integer buffers."""
        if not self.int_tensors[0]:
            return
        local = self.int_local
        if not (torch.equal(self.int_max, local) and torch.equal(self.int_negated_min, self.int_local_negated)):
            raise AveragingError(
                "integer buffers (such as BatchNorm's num_batches_tracked) differ across ranks: "
                f"this rank has {local.tolist()[:8]}, the maximum over ranks is "
                f"{self.int_max.tolist()[:8]}; every branch must take the same number of steps"
            )

    def _optimizer_buckets(self, optimizers: Sequence[torch.optim.Optimizer]) -> list[Bucket]:
        if self.optimizer_buckets is None:
            states = [optimizer_float_state(o) for o in optimizers]
            if not states[0]:
                return []  # no state yet (no step taken)
            self.optimizer_buckets = build_buckets(states)
        return self.optimizer_buckets

    def broadcast_from_first(self) -> None:
        """Give every hosted branch on every rank the weights and buffers of global rank 0's first branch."""
        for bucket in self.param_buckets + self.buffer_buckets:
            torch._foreach_copy_(bucket.views, bucket.tensors[0])
            if self.topology.distributed:
                dist.broadcast(bucket.flat, src=0, group=self.topology.world_group)
            for tensors in bucket.tensors:
                torch._foreach_copy_(tensors, bucket.views)
        if self.int_tensors[0]:
            torch._foreach_copy_(self.int_local_views, self.int_tensors[0])
            if self.topology.distributed:
                dist.broadcast(self.int_local, src=0, group=self.topology.world_group)
            for tensors in self.int_tensors:
                torch._foreach_copy_(tensors, self.int_local_views)

    @property
    def state_bytes(self) -> int:
        """Bytes of parameters and floating-point buffers of one branch."""
        return sum(b.flat.numel() * b.flat.element_size() for b in self.param_buckets + self.buffer_buckets)
