"""Diversity and locality of the branches: how far they move from their mean in a round,
and how well each one (and their logit ensemble) does on its own.

* :func:`measure_diversity` runs on every rank before an average step. It returns each
  branch's L2 distance to the mean of all branches (the next consensus), absolute and
  relative to the norm of that mean. It also returns the root-mean-square pairwise
  distance between branches. Distances cover the floating-point parameters, not the
  buffers.
* :func:`gather_branch_modules` gives every rank a copy of every branch, so that
  :func:`evaluate_branches` can score each branch and their ensemble on the rank's share
  of the validation data.

The RMS pairwise distance needs no pairwise exchange, because for the mean ``m`` of d
points the mean over ordered pairs ``i != j`` of ``||θi - θj||²`` equals
``2 * Σi ||θi - m||² / (d - 1)``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class Diversity:
    """Distances of the branches to their mean, measured before one average step."""

    branch_distance: list[float]
    """L2 distance of each branch (by global index) to the mean of all branches."""
    branch_distance_relative: list[float]
    """``branch_distance`` divided by the L2 norm of the mean."""
    pairwise_distance_rms: float
    """Root-mean-square L2 distance over ordered pairs of distinct branches (0 for d = 1)."""
    consensus_norm: float
    """L2 norm of the mean of all branches' parameters."""

    def to_record(self) -> dict:
        return dataclasses.asdict(self)


def summarize_distances(squared_distances: Sequence[float], consensus_squared_norm: float) -> Diversity:
    """Build a :class:`Diversity` from each branch's squared distance to the mean and the
    mean's squared norm."""
    d = len(squared_distances)
    distances = [math.sqrt(max(0.0, x)) for x in squared_distances]
    norm = math.sqrt(max(0.0, consensus_squared_norm))
    relative = [x / norm if norm > 0 else math.nan for x in distances]
    pairwise = math.sqrt(2.0 * sum(max(0.0, x) for x in squared_distances) / (d - 1)) if d > 1 else 0.0
    return Diversity(distances, relative, pairwise, norm)


def parameter_vector(module: nn.Module) -> torch.Tensor:
    """Return the module's floating-point parameters as one float32 vector (a copy)."""
    params = [p.detach().reshape(-1).float() for p in module.parameters() if p.is_floating_point()]
    return torch.cat(params)


def _distributed(lookaround) -> bool:
    return lookaround.topology.distributed and dist.is_initialized()


@torch.no_grad()
def measure_diversity(lookaround) -> Diversity:
    """Measure the branches' distances to their mean; call it on every rank.

    The mean is computed here, by one all-reduce of the parameters over the world, so it
    works whether or not an average step follows (``IndependentBranches`` never
    averages). Only the first rank of each branch contributes its branch, because the
    ranks of one branch hold equal parameters. A second all-reduce of d + 1 numbers
    collects the distances. Both collectives are over the world, so every rank must call
    this at the same round.
    """
    topology = lookaround.topology
    d = topology.num_branches
    contributes = topology.position == 0
    vectors = {b.index: parameter_vector(b.module) for b in lookaround.branches}

    mean = torch.zeros_like(next(iter(vectors.values())))
    if contributes:
        for vector in vectors.values():
            mean += vector
    if _distributed(lookaround):
        dist.all_reduce(mean, group=topology.world_group)
    mean /= d

    squares = torch.zeros(d + 1, dtype=torch.float64, device=mean.device)
    if contributes:
        for index, vector in vectors.items():
            squares[index] = torch.linalg.vector_norm(vector - mean, dtype=torch.float64) ** 2
    if topology.rank == 0:
        squares[d] = torch.linalg.vector_norm(mean, dtype=torch.float64) ** 2
    if _distributed(lookaround):
        dist.all_reduce(squares, group=topology.world_group)
    values = squares.tolist()
    return summarize_distances(values[:d], values[d])


@torch.no_grad()
def gather_branch_modules(lookaround, modules: Optional[list[nn.Module]] = None) -> list[nn.Module]:
    """Return one module per global branch, equal on every rank; call it on every rank.

    Parameters come from the first rank of each branch. Floating-point buffers (BatchNorm
    statistics) are averaged over the ranks of the branch, as the average step would do.
    Integer buffers are copied from this rank's first hosted branch, since they agree
    across branches. Pass the list returned by an earlier call as ``modules`` to reuse
    its memory. Costs one all-reduce of d times the model's floating-point state over the
    world, and d copies of the model on every rank.
    """
    topology = lookaround.topology
    d = topology.num_branches
    template = lookaround.consensus
    if modules is None:
        modules = [copy.deepcopy(template) for _ in range(d)]
    if len(modules) != d:
        raise ValueError(f"expected {d} modules to gather into, found {len(modules)}")

    parameter_names = {name for name, _ in template.named_parameters()}
    template_state = template.state_dict()
    float_names = [n for n, t in template_state.items() if t.is_floating_point()]
    total = sum(template_state[n].numel() for n in float_names)
    device = next(template.parameters()).device
    flat = torch.zeros(d, total, dtype=torch.float32, device=device)

    for branch in lookaround.branches:
        state = branch.module.state_dict()
        pieces = []
        for name in float_names:
            tensor = state[name].reshape(-1).float()
            if name in parameter_names:
                pieces.append(tensor if topology.position == 0 else torch.zeros_like(tensor))
            else:
                pieces.append(tensor / topology.ranks_per_branch)
        flat[branch.index] = torch.cat(pieces)
    if _distributed(lookaround):
        dist.all_reduce(flat, group=topology.world_group)

    for index, module in enumerate(modules):
        state = module.state_dict()
        offset = 0
        for name in float_names:
            target = state[name]
            target.copy_(flat[index, offset: offset + target.numel()].view(target.shape))
            offset += target.numel()
        for name, tensor in template_state.items():
            if not tensor.is_floating_point():
                state[name].copy_(tensor)
    return modules


@torch.no_grad()
def evaluate_branches(modules: Sequence[nn.Module], data: Iterable, device: torch.device,
                      num_samples: Optional[int] = None, amp_dtype: Optional[torch.dtype] = None,
                      memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """Score each module and the mean of their logits on this rank's validation share.

    Sums are all-reduced over the world when a process group exists, so every rank
    returns the totals over all ranks. Keys: ``branch_test_top1`` and ``branch_test_loss``
    (lists, one entry per module), ``ensemble_test_top1``, ``ensemble_test_top5`` and
    ``ensemble_test_loss``. Accuracies are percentages, losses mean cross-entropy (NLL).
    """
    d = len(modules)
    # Per module: loss sum, top-1 hits; then the ensemble's loss, top-1, top-5 and the count.
    totals = torch.zeros(2 * d + 4, dtype=torch.float64, device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for module in modules:
        module.eval()
    for images, labels in data:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = [module(images).float() for module in modules]
        for i, output in enumerate(logits):
            totals[2 * i] += F.cross_entropy(output, labels, reduction="sum").double()
            totals[2 * i + 1] += (output.argmax(dim=1) == labels).sum()
        ensemble = torch.stack(logits).mean(dim=0)
        top5 = ensemble.topk(min(5, ensemble.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        totals[2 * d] += F.cross_entropy(ensemble, labels, reduction="sum").double()
        totals[2 * d + 1] += hits[:, 0].sum()
        totals[2 * d + 2] += hits.any(dim=1).sum()
        totals[2 * d + 3] += labels.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)

    values = totals.tolist()
    count = values[-1]
    if num_samples is not None and int(count) != num_samples:
        raise RuntimeError(f"branch evaluation counted {int(count)} samples, expected {num_samples}")
    count = max(count, 1.0)
    return {
        "branch_test_top1": [100.0 * values[2 * i + 1] / count for i in range(d)],
        "branch_test_loss": [values[2 * i] / count for i in range(d)],
        "ensemble_test_top1": 100.0 * values[2 * d + 1] / count,
        "ensemble_test_top5": 100.0 * values[2 * d + 2] / count,
        "ensemble_test_loss": values[2 * d] / count,
    }
