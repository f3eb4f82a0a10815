"""The interface every input backend implements, and what it needs to know of the run.

The trainer sees only this: an iterable of steps, each step a list with one
``(images, labels)`` pair per branch that this rank hosts; the number of steps per epoch
(equal on every rank); ``set_epoch``; and a state to save and restore. Backends: the
torchvision DataLoader (:mod:`lookaround_dist.data.torchvision_backend`) and NVIDIA DALI
(:mod:`lookaround_dist.data.dali_backend`).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Iterator, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where this rank's input comes from: the branches it hosts and its place in them.

    ``position`` and ``ranks_per_branch`` split each base batch disjointly across the ranks
    of a branch. Sample order depends on ``seed`` and the epoch only (unless sampling is
    independent per branch); augmentation randomness also depends on the branch and the
    position.
    """

    branch_indices: tuple[int, ...]
    position: int
    ranks_per_branch: int
    rank: int
    world_size: int
    seed: int

    @classmethod
    def from_topology(cls, topology, seed: int) -> "Placement":
        return cls(
            branch_indices=tuple(topology.branch_indices),
            position=topology.position,
            ranks_per_branch=topology.ranks_per_branch,
            rank=topology.rank,
            world_size=topology.world_size,
            seed=seed,
        )


Batch = tuple[torch.Tensor, torch.Tensor]


class TrainData(abc.ABC):
    """Training input for the branches of one rank.

    Iterating yields ``steps_per_epoch`` steps for the current epoch (fewer after
    :meth:`load_state_dict` restored a position inside it); each step is a list holding
    one ``(images, labels)`` batch per hosted branch, in the order of
    ``placement.branch_indices``. At each step, every branch gets the same base samples
    (each under its own augmentation) unless sampling is independent.
    """

    placement: Placement
    augmentations: Sequence[str]

    @property
    @abc.abstractmethod
    def steps_per_epoch(self) -> int:
        """Steps in one full epoch; equal on every rank."""

    @abc.abstractmethod
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose sample order the next iteration follows."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[list[Batch]]:
        ...

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """The position to resume from: plain Python values and tensors only."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        ...

    def close(self) -> None:
        """Release workers or pipelines."""


class EvalData(abc.ABC):
    """Validation input: every sample is seen by exactly one rank, in a fixed order."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Batch]:
        ...

    @property
    @abc.abstractmethod
    def num_samples(self) -> int:
        """Samples over all ranks."""

    def close(self) -> None:
        """Release workers or pipelines."""
