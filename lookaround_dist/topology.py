"""Mapping of ranks to branches, and the process groups that follow from it.

Two layouts are supported:

* ``W % d == 0``: ``s = W // d`` ranks per branch. Rank ``r`` runs branch ``r // s`` at
  position ``r % s``. Branch groups are runs of consecutive ranks, so with torchrun's
  numbering the per-step gradient all-reduce stays inside a node; peer group ``i`` holds
  the ranks at position ``i`` of every branch and carries the average step.
* ``d % W == 0``: every rank hosts ``d // W`` branches and runs them in turn. Each branch
  group is the single rank that hosts it; the peer group is the whole world.

:func:`validate_layout` checks a layout without any process group, so that a bad
``(W, d)`` is rejected before the first collective.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.distributed as dist


class TopologyError(ValueError):
    """A world size and number of branches that do not fit together."""


def fitting_world_sizes(num_branches: int, limit: int = 64) -> list[int]:
    """Return the world sizes up to ``limit`` that fit ``num_branches`` branches."""
    return [w for w in range(1, limit + 1) if w % num_branches == 0 or num_branches % w == 0]


def validate_layout(world_size: int, num_branches: int) -> None:
    """Raise :class:`TopologyError` unless ``world_size`` ranks can run ``num_branches`` branches."""
    if not isinstance(num_branches, int) or num_branches < 1:
        raise TopologyError(f"the number of branches d must be an integer >= 1, found {num_branches!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise TopologyError(f"the world size W must be an integer >= 1, found {world_size!r}")
    if world_size % num_branches == 0 or num_branches % world_size == 0:
        return
    fits = ", ".join(str(w) for w in fitting_world_sizes(num_branches, limit=max(16, 2 * num_branches)))
    raise TopologyError(
        f"world size W={world_size} does not fit d={num_branches} branches: W must be a multiple "
        f"of d (several ranks per branch) or a divisor of d (several branches per rank), but "
        f"{world_size} % {num_branches} = {world_size % num_branches} and "
        f"{num_branches} % {world_size} = {num_branches % world_size}. "
        f"World sizes that fit d={num_branches}: {fits}, ... "
        f"Change the number of processes (torchrun --nproc-per-node) or lookaround.num_branches."
    )


@dataclasses.dataclass(frozen=True)
class Layout:
    """The pure rank arithmetic of one ``(world_size, num_branches)`` layout, for one rank."""

    world_size: int
    num_branches: int
    rank: int

    def __post_init__(self) -> None:
        validate_layout(self.world_size, self.num_branches)
        if not 0 <= self.rank < self.world_size:
            raise TopologyError(f"rank must lie in [0, {self.world_size}), found {self.rank}")

    @property
    def ranks_per_branch(self) -> int:
        """Number of ranks that run one branch together (1 when branches share ranks)."""
        return max(1, self.world_size // self.num_branches)

    @property
    def branches_per_rank(self) -> int:
        """Number of branches each rank hosts and runs in turn (1 when ranks share a branch)."""
        return max(1, self.num_branches // self.world_size)

    @property
    def position(self) -> int:
        """This rank's position inside its branch group."""
        return self.rank % self.ranks_per_branch

    @property
    def branch_indices(self) -> tuple[int, ...]:
        """The branches this rank hosts."""
        if self.branches_per_rank > 1:
            first = self.rank * self.branches_per_rank
            return tuple(range(first, first + self.branches_per_rank))
        return (self.rank // self.ranks_per_branch,)

    def branch_ranks(self, branch: int) -> tuple[int, ...]:
        """Global ranks that run ``branch``."""
        if self.branches_per_rank > 1:
            return (branch // self.branches_per_rank,)
        s = self.ranks_per_branch
        return tuple(range(branch * s, (branch + 1) * s))

    def all_branch_groups(self) -> list[tuple[int, ...]]:
        """Rank lists of every branch group, in creation order, without repeats."""
        groups: list[tuple[int, ...]] = []
        for branch in range(self.num_branches):
            ranks = self.branch_ranks(branch)
            if ranks not in groups:
                groups.append(ranks)
        return groups

    def all_peer_groups(self) -> list[tuple[int, ...]]:
        """Rank lists of every peer group (one rank per branch at the same position)."""
        if self.branches_per_rank > 1:
            return [tuple(range(self.world_size))]
        s = self.ranks_per_branch
        return [tuple(range(i, self.world_size, s)) for i in range(s)]

    @property
    def branch_group_ranks(self) -> tuple[int, ...]:
        return self.branch_ranks(self.branch_indices[0])

    @property
    def peer_group_ranks(self) -> tuple[int, ...]:
        return self.all_peer_groups()[self.position if self.branches_per_rank == 1 else 0]

    def describe(self) -> list[str]:
        """Return one line per branch: its index and the ranks that run it."""
        return [
            f"branch {b}: ranks {list(self.branch_ranks(b))}" for b in range(self.num_branches)
        ]


class Topology:
    """A validated layout plus the process groups it needs.

    Build it with :meth:`create` after ``torch.distributed.init_process_group`` (or with no
    process group at all for a single process). Every rank creates every branch group and
    every peer group in the same order, as ``torch.distributed.new_group`` requires.

    Example::

        dist.init_process_group("gloo")
        topology = Topology.create(num_branches=2)
        topology.branch_indices   # the branches this rank runs
    """

    def __init__(self, layout: Layout, branch_group: Any, peer_group: Any, world_group: Any):
        self.layout = layout
        self.branch_group = branch_group
        self.peer_group = peer_group
        self.world_group = world_group

    @classmethod
    def create(cls, num_branches: int, timeout: Any = None) -> "Topology":
        """Validate the layout for the current world and create its process groups."""
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        layout = Layout(world_size=world_size, num_branches=num_branches, rank=rank)
        if not distributed:
            return cls(layout, None, None, None)

        kwargs = {} if timeout is None else {"timeout": timeout}
        branch_group = peer_group = None
        # Every rank walks the same list of groups in the same order; new_group is itself
        # a collective over the world and hangs or mismatches if any rank skips one.
        for ranks in layout.all_branch_groups():
            group = dist.new_group(list(ranks), **kwargs)
            if rank in ranks:
                branch_group = group
        for ranks in layout.all_peer_groups():
            group = dist.new_group(list(ranks), **kwargs)
            if rank in ranks:
                peer_group = group
        return cls(layout, branch_group, peer_group, dist.group.WORLD)

    # Convenience accessors: everything is derived from the layout.
    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def num_branches(self) -> int:
        return self.layout.num_branches

    @property
    def ranks_per_branch(self) -> int:
        return self.layout.ranks_per_branch

    @property
    def branches_per_rank(self) -> int:
        return self.layout.branches_per_rank

    @property
    def position(self) -> int:
        return self.layout.position

    @property
    def branch_indices(self) -> tuple[int, ...]:
        return self.layout.branch_indices

    @property
    def distributed(self) -> bool:
        return self.world_group is not None
