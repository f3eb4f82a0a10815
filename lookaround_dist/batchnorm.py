"""BatchNorm recalibration: running statistics recomputed from training batches.

Averaging weights (the average step, SWA) also averages BatchNorm's running statistics,
but the mean of several networks' statistics is not the statistics of the averaged
network. :func:`recalibrate_batchnorm` recomputes them with forward passes of the model
itself over training batches, then averages them over ranks so that every rank ends with
the same model.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import update_bn


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Return the BatchNorm layers of ``module`` that keep running statistics."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def batchnorm_statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    """Return copies of every running mean and variance, keyed by state-dict name."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()
            if name.endswith(("running_mean", "running_var"))}


def recalibrate_batchnorm(module: nn.Module, batches: Iterable, num_batches: int,
                          device: Optional[torch.device] = None, group=None,
                          memory_format: torch.memory_format = torch.contiguous_format) -> int:
    """Recompute the running statistics of ``module`` from ``num_batches`` of ``batches``.

    ``batches`` yields input tensors or ``(images, labels)`` pairs. The statistics are
    reset and recomputed as the equally weighted mean over the batches
    (``torch.optim.swa_utils.update_bn``), then averaged over the ranks of ``group`` (the
    world by default) when a process group exists. Every rank must pass the same
    ``num_batches`` and ``batches`` must hold at least that many, or the all-reduce
    hangs. Returns the number of batches used.

    NOTE: the cross-rank running variance is the mean of the ranks' variances. It leaves
    out the spread of the ranks' means, which is small when every rank samples the same
    distribution.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, found {num_batches}")
    layers = batchnorm_layers(module)
    if not layers:
        return 0
    device = device or next(module.parameters()).device

    used = 0

    def inputs():
        nonlocal used
        for batch in itertools.islice(batches, num_batches):
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            used += 1
            yield images.to(device, non_blocking=True, memory_format=memory_format)

    was_training = module.training
    update_bn(inputs(), module)
    module.train(was_training)
    if used < num_batches:
        raise ValueError(f"expected {num_batches} batches for BatchNorm recalibration, found {used}")

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(group)
        tensors = [t for layer in layers for t in (layer.running_mean, layer.running_var)]
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset: offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
    return used


def training_images(train_data) -> Iterator[torch.Tensor]:
    """Yield the current epoch's training steps as image batches, every hosted augmentation
    joined, and restore the input's position when closed.

    ``train_data`` is a :class:`lookaround_dist.data.TrainData`. Close the generator
    (``contextlib.closing``) after taking the batches needed, so that the training input
    continues where it stood.

    NOTE: checked with the torchvision backend only; the DALI backend's state restore
    after a partial pass has not been run.
    """
    state = train_data.state_dict()
    try:
        for step in train_data:
            yield torch.cat([images for images, _ in step])
    finally:
        train_data.load_state_dict(state)
