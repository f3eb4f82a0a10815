"""The public API: the branches a rank hosts, and the round that ends in an average step.

A custom training loop needs three things from this module: :class:`Lookaround` to build
the branches (identical start, DDP inside each branch), the ``branches`` to train, and
:meth:`Lookaround.step` after every optimizer step. Example, for a script started by
``torchrun --nproc-per-node 4``::

    import torch, torch.distributed as dist
    from lookaround_dist import Lookaround, Topology
    from lookaround_dist.models import build_model

    dist.init_process_group("gloo")
    topology = Topology.create(num_branches=2)            # 2 ranks per branch
    lookaround = Lookaround(lambda: build_model("resnet20", 10), topology, k=5)
    for branch in lookaround.branches:                    # the branches this rank hosts
        branch.optimizer = torch.optim.SGD(branch.module.parameters(), lr=0.1, momentum=0.9)
    for batches in loader:                                # one (images, labels) per branch
        for branch, (images, labels) in zip(lookaround.branches, batches):
            loss = torch.nn.functional.cross_entropy(branch.model(images), labels)
            branch.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            branch.optimizer.step()
        lookaround.step()                                 # every k-th call averages
    lookaround.average()                                  # end the epoch on a consensus
    torch.save(lookaround.consensus.state_dict(), "consensus.pt")
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .averaging import AverageStats, BranchAverager
from .topology import Topology


@dataclasses.dataclass
class Branch:
    """One branch hosted by this rank.

    ``model`` is what to call for training (DDP over the branch group when the branch
    spans several ranks); ``module`` is the plain model underneath, whose tensors the
    average step writes.
    """

    index: int
    module: nn.Module
    model: nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[Any] = None
    scaler: Optional[Any] = None


class Lookaround:
    """Branches of one model, trained in rounds of ``k`` steps that end in an average step.

    ``build_model`` is called once per hosted branch; whatever it returns, every branch on
    every rank starts from global rank 0's first branch (parameters and buffers are
    broadcast), so per-rank seeds do not matter.
    """

    def __init__(self, build_model: Callable[[], nn.Module], topology: Topology, k: int = 5,
                 average_optimizer_state: bool = False, device: Optional[torch.device] = None,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 ddp_options: Optional[dict] = None):
        if k < 1:
            raise ValueError(f"k (steps per round) must be >= 1, found {k}")
        self.topology = topology
        self.k = k
        self.average_optimizer_state = average_optimizer_state
        self.device = device or torch.device("cpu")
        self.steps_in_round = 0
        self.rounds_completed = 0

        modules = []
        for _ in topology.branch_indices:
            module = build_model().to(self.device, memory_format=memory_format)
            modules.append(module)
        self.averager = BranchAverager(modules, topology)
        self.averager.broadcast_from_first()

        self.branches = [
            Branch(index=b, module=m, model=self._wrap(m, ddp_options))
            for b, m in zip(topology.branch_indices, modules)
        ]

    def _wrap(self, module: nn.Module, ddp_options: Optional[dict]) -> nn.Module:
        if self.topology.ranks_per_branch == 1:
            return module
        options = {
            # Running statistics are averaged over all ranks at the average step, so the
            # per-step buffer broadcast DDP does by default would only cost time.
            "broadcast_buffers": False,
            "process_group": self.topology.branch_group,
        }
        if self.device.type == "cuda":
            options["device_ids"] = [self.device.index]
        options.update(ddp_options or {})
        return DistributedDataParallel(module, **options)

    @property
    def consensus(self) -> nn.Module:
        """The first hosted branch's module; the consensus right after an average step."""
        return self.branches[0].module

    @property
    def modules(self) -> list[nn.Module]:
        return [b.module for b in self.branches]

    def tick(self) -> bool:
        """Count one optimizer step of every hosted branch; return whether the round is complete.

        For loops that run checks of their own before the average step; others call
        :meth:`step`.
        """
        self.steps_in_round += 1
        return self.steps_in_round >= self.k

    def step(self, healthy: Optional[Sequence[bool]] = None) -> bool:
        """Count one optimizer step of every hosted branch; average after every k-th.

        Returns whether an average step ran.
        """
        if self.tick():
            self.average(healthy)
            return True
        return False

    def average(self, healthy: Optional[Sequence[bool]] = None, check_integers: bool = True) -> AverageStats:
        """Run an average step now (the end of an epoch, or a shorter last round).

        ``check_integers=False`` skips the check that integer buffers agree on every rank
        (see :meth:`BranchAverager.average`).
        """
        optimizers = None
        if self.average_optimizer_state:
            optimizers = [b.optimizer for b in self.branches]
            if any(o is None for o in optimizers):
                raise ValueError("average_optimizer_state needs an optimizer on every branch")
        stats = self.averager.average(optimizers, healthy, check_integers=check_integers)
        self.steps_in_round = 0
        self.rounds_completed += 1
        return stats

    @property
    def last_average(self) -> AverageStats:
        return self.averager.stats

    def train(self, mode: bool = True) -> None:
        for branch in self.branches:
            branch.model.train(mode)
