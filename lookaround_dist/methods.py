"""The baselines Lookaround is compared with, built from the same pieces as Lookaround.

Every method reads the same data (the shared base batches, each under the d branch
augmentations) for the same number of optimizer steps:

* ``lookaround``: d branches, one augmentation each, averaged every k steps.
* ``sgd``: one model trained on all d augmentations of every base batch, so each step
  processes d times the data of one branch (the equal-compute baseline). The model topology
  has one branch over all W ranks (DDP over the world), while the data placement lists
  all d augmentations for every rank; :func:`concat_batches` joins them into one batch.
* ``independent``: d branches like Lookaround, never averaged
  (:class:`IndependentBranches`); evaluated one by one and as a logit ensemble.
* ``lookahead``: the ``sgd`` model plus slow weights (:class:`Lookahead`) pulled towards
  the fast weights every k steps.

Stochastic weight averaging (:class:`StochasticWeightAverage`) can run on top of any
method that forms a consensus.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .api import Lookaround
from .averaging import AverageStats
from .batchnorm import recalibrate_batchnorm
from .data.base import Batch, Placement
from .topology import Topology

METHODS = ("lookaround", "sgd", "independent", "lookahead")
SINGLE_MODEL_METHODS = ("sgd", "lookahead")
"""Methods that train one model on the concatenated batches of all d augmentations."""


def check_method(method: str) -> None:
    """Raise ValueError unless ``method`` is one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")


def model_branch_count(method: str, num_branches: int) -> int:
    """Return the number of branches of the model topology: 1 for single-model methods, else d."""
    check_method(method)
    return 1 if method in SINGLE_MODEL_METHODS else num_branches


def data_placement(method: str, topology: Topology, num_branches: int, seed: int) -> Placement:
    """Return where this rank's input comes from under ``method``.

    For single-model methods ``topology`` has one branch over all ranks: every rank takes
    its own slice of the base batch (position = rank) under all ``num_branches``
    augmentations, so that one step of the model processes the data of all d branches.
    """
    check_method(method)
    if method not in SINGLE_MODEL_METHODS:
        return Placement.from_topology(topology, seed)
    if topology.num_branches != 1:
        raise ValueError(f"method {method} expects a topology of one branch, found {topology.num_branches}")
    return Placement(
        branch_indices=tuple(range(num_branches)), position=topology.rank,
        ranks_per_branch=topology.world_size, rank=topology.rank,
        world_size=topology.world_size, seed=seed,
    )


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Join the batches of several augmentations into one ``(images, labels)`` batch."""
    images = torch.cat([images for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    return images, labels


def batches_for_branches(method: str, batches: list[Batch]) -> list[Batch]:
    """Return one batch per hosted branch: the d augmentations joined for single-model methods."""
    if method in SINGLE_MODEL_METHODS:
        return [concat_batches(batches)]
    return batches


class IndependentBranches(Lookaround):
    """Branches that train side by side and are never averaged.

    Rounds are still counted, so the trainer's round boundary (the non-finite guard,
    diversity measurements) runs as for Lookaround, but :meth:`average` leaves every
    tensor as it is. ``consensus`` is only the first hosted branch, which differs from
    rank to rank when ranks host different branches.
    """

    def average(self, healthy: Optional[Sequence[bool]] = None, check_integers: bool = True) -> AverageStats:
        self.steps_in_round = 0
        self.rounds_completed += 1
        self.averager.stats = AverageStats()
        return self.averager.stats


def build_branches(method: str, build_model: Callable[[], nn.Module], topology: Topology,
                   **options) -> Lookaround:
    """Return the :class:`Lookaround` (or :class:`IndependentBranches`) that ``method`` trains.

    ``options`` are passed to the constructor (``k``, ``device``, ...). For single-model
    methods ``topology`` must have one branch. Their average step then only averages the
    ranks' BatchNorm statistics, because DDP already keeps the weights equal.
    """
    check_method(method)
    expected = model_branch_count(method, topology.num_branches)
    if topology.num_branches != expected:
        raise ValueError(f"method {method} expects a topology of {expected} branch(es), found {topology.num_branches}")
    cls = IndependentBranches if method == "independent" else Lookaround
    return cls(build_model, topology, **options)


class Lookahead:
    """Lookahead's slow weights (Zhang et al., 2019) over one module's parameters.

    Call :meth:`synchronize` after every k optimizer steps of the fast weights (the
    module's own): it moves the slow weights towards the fast ones,
    ``slow += alpha * (fast - slow)``, and restarts the fast weights from the result.
    Buffers (BatchNorm statistics) and the optimizer state stay with the fast weights.
    """

    def __init__(self, module: nn.Module, alpha: float = 0.5):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead alpha must lie in (0, 1], found {alpha}")
        self.alpha = alpha
        self.fast = [p for p in module.parameters() if p.is_floating_point()]
        self.slow = [p.detach().clone() for p in self.fast]
        self.synchronizations = 0

    @torch.no_grad()
    def synchronize(self) -> None:
        fast = [p.detach() for p in self.fast]
        # slow + alpha * (fast - slow), computed as lerp so that alpha = 1 copies exactly.
        torch._foreach_lerp_(self.slow, fast, self.alpha)
        torch._foreach_copy_(fast, self.slow)
        self.synchronizations += 1

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "slow": [t.clone() for t in self.slow],
                "synchronizations": self.synchronizations}

    def load_state_dict(self, state: dict) -> None:
        if len(state["slow"]) != len(self.slow):
            raise ValueError(f"expected {len(self.slow)} slow tensors, found {len(state['slow'])}")
        torch._foreach_copy_(self.slow, [t.to(s.device) for s, t in zip(self.slow, state["slow"])])
        self.synchronizations = int(state["synchronizations"])


class StochasticWeightAverage:
    """The equally weighted mean of the consensus at chosen points (SWA, Izmailov et al., 2018).

    :meth:`update` adds the current consensus, which is the same on every rank after an
    average step, so every rank computes the same mean without communication.
    :meth:`recalibrate` recomputes the BatchNorm statistics of the mean, because averaged
    weights do not match averaged statistics.
    """

    def __init__(self, consensus: nn.Module):
        self.averaged = AveragedModel(consensus)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self, consensus: nn.Module) -> None:
        self.averaged.update_parameters(consensus)

    def recalibrate(self, batches: Iterable, num_batches: int, device: Optional[torch.device] = None,
                    memory_format: torch.memory_format = torch.contiguous_format) -> int:
        """Recompute the mean's BatchNorm statistics; see :func:`recalibrate_batchnorm`."""
        return recalibrate_batchnorm(self.module, batches, num_batches, device=device,
                                     memory_format=memory_format)

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)
