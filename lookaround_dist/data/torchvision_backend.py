"""The torchvision input backend: a map-style data set over a :class:`SampleIndex`, a batch
sampler that implements the shared base batches, and a DataLoader with CPU workers.

Sample order: a permutation of all samples drawn from ``(seed, epoch)`` (and the branch,
when sampling is independent). Step ``t`` takes the base batch
``order[t*B*s : (t+1)*B*s]`` where ``B`` is the batch per rank and ``s`` the ranks per
branch; the rank at position ``p`` takes every ``s``-th sample of it starting at ``p``.
Every branch therefore sees the same base samples at each step, and the ranks of a branch
see disjoint ones.

Augmentation randomness is drawn from a generator seeded by
``(seed, epoch, branch, sample)``, so it does not depend on the number of workers, on
which worker handles a sample, or on where a resumed run starts.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Iterator, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from . import augment
from .base import Batch, EvalData, Placement, TrainData
from .sources import DataError, SampleIndex

log = logging.getLogger(__name__)

_MIX = 0x9E3779B97F4A7C15


def mix_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (a splitmix64-style hash)."""
    state = 0
    for value in values:
        state = (state ^ (int(value) + _MIX + (state << 6) + (state >> 2))) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state & 0x7FFFFFFFFFFFFFFF


def decode_rgb(blob: bytes) -> torch.Tensor:
    """Decode an encoded image to a 3-channel uint8 CHW tensor with PIL.

    Raises OSError (PIL's UnidentifiedImageError included) or ValueError for data that
    is not a complete image.
    """
    with Image.open(io.BytesIO(blob)) as image:
        return pil_to_tensor(image.convert("RGB"))


def decode(blob: bytes, index: SampleIndex, sample: int) -> torch.Tensor:
    """Decode an encoded image to a 3-channel uint8 CHW tensor; errors name shard and key."""
    try:
        return decode_rgb(blob)
    except (OSError, ValueError) as error:
        entry = index.samples[sample]
        raise DataError(f"cannot decode image {entry.key} in {entry.source}: {error}") from None


class BranchSampleSet(Dataset):
    """Decodes a sample once and applies each hosted branch's transform to it.

    Items are requested as ``(epoch, sample, per_branch_samples)`` keys built by
    :class:`BaseBatchSampler`; the result holds one ``(image, label)`` per hosted branch,
    or ``None`` for an image that does not decode when decode errors are skipped.
    """

    def __init__(self, index: SampleIndex, placement: Placement, augmentations: Sequence[str],
                 image_size: int, mean, std, skip_decode_errors: bool):
        self.index = index
        self.branches = placement.branch_indices
        self.seed = placement.seed
        self.transforms = [
            augment.train_transform(augmentations[b], image_size, mean, std) for b in self.branches
        ]
        self.skip_decode_errors = skip_decode_errors

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, tuple[int, ...]]):
        epoch, samples = key
        decoded: dict[int, Optional[torch.Tensor]] = {}
        items = []
        in_worker = torch.utils.data.get_worker_info() is not None
        saved_state = None if in_worker else torch.get_rng_state()
        for transform, branch, sample in zip(self.transforms, self.branches, samples):
            if sample not in decoded:
                blob, _ = self.index.read(sample)
                try:
                    decoded[sample] = decode(blob, self.index, sample)
                except DataError:
                    if not self.skip_decode_errors:
                        raise
                    decoded[sample] = None
            image = decoded[sample]
            if image is None:
                items.append(None)
                continue
            torch.manual_seed(mix_seed(self.seed, epoch, branch, sample))
            items.append((transform(image), self.index.samples[sample].label))
        if saved_state is not None:
            torch.set_rng_state(saved_state)
        return items


class BaseBatchSampler:
    """Yields, step by step, this rank's share of the base batch as dataset keys."""

    def __init__(self, num_samples: int, batch_size: int, placement: Placement,
                 independent: bool, drop_last: bool, max_steps: int = 0):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.placement = placement
        self.independent = independent
        self.drop_last = drop_last
        self.epoch = 0
        self.start_step = 0
        global_batch = batch_size * placement.ranks_per_branch
        if num_samples < global_batch and drop_last:
            raise DataError(
                f"{num_samples} training samples cannot fill one base batch of {global_batch} "
                f"(data.batch_size={batch_size} x {placement.ranks_per_branch} ranks per branch); "
                f"use a smaller batch or data.last_batch=pad"
            )
        full = num_samples // global_batch if drop_last else math.ceil(num_samples / global_batch)
        self.steps = min(full, max_steps) if max_steps > 0 else full

    def order(self, branch: int) -> torch.Tensor:
        """Return the epoch's sample order, the same for every branch unless sampling is independent."""
        salt = branch + 1 if self.independent else 0
        generator = torch.Generator().manual_seed(mix_seed(self.placement.seed, self.epoch, salt))
        order = torch.randperm(self.num_samples, generator=generator)
        needed = self.steps * self.batch_size * self.placement.ranks_per_branch
        if needed > len(order):  # pad the last base batch by wrapping around
            order = torch.cat([order, order[: needed - len(order)]])
        return order

    def rank_indices(self, order: torch.Tensor, step: int) -> list[int]:
        s = self.placement.ranks_per_branch
        base = order[step * self.batch_size * s: (step + 1) * self.batch_size * s]
        return base[self.placement.position:: s].tolist()

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[list]:
        orders = [self.order(b) for b in self.placement.branch_indices]
        for step in range(self.start_step, self.steps):
            per_branch = [self.rank_indices(order, step) for order in orders]
            yield [(self.epoch, samples) for samples in zip(*per_branch)]


def collate_branches(items: list) -> list[Batch]:
    """Stack per-sample branch lists into one (images, labels) batch per branch."""
    num_branches = len(items[0])
    batches = []
    for b in range(num_branches):
        kept = [item[b] for item in items if item[b] is not None]
        if not kept:
            raise DataError("every image of a batch failed to decode")
        images = torch.stack([image for image, _ in kept])
        labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
        batches.append((images, labels))
    return batches


class TorchvisionTrainData(TrainData):
    def __init__(self, index: SampleIndex, placement: Placement, augmentations: Sequence[str],
                 image_size: int, batch_size: int, num_workers: int, mean, std,
                 independent_sampling: bool = False, last_batch: str = "drop",
                 skip_decode_errors: bool = False, max_steps_per_epoch: int = 0,
                 pin_memory: bool = False, prefetch_depth: int = 2):
        augment.check_augmentations(augmentations)
        self.placement = placement
        self.augmentations = list(augmentations)
        self.index = index
        self.dataset = BranchSampleSet(index, placement, augmentations, image_size, mean, std,
                                       skip_decode_errors)
        self.sampler = BaseBatchSampler(len(index), batch_size, placement, independent_sampling,
                                        drop_last=(last_batch == "drop"),
                                        max_steps=max_steps_per_epoch)
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_depth} if num_workers > 0 else {}
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=collate_branches, pin_memory=pin_memory, **extra)
        self.step_in_epoch = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.sampler.epoch:
            self.sampler.start_step = 0
            self.step_in_epoch = 0
        self.sampler.epoch = epoch

    def __iter__(self) -> Iterator[list[Batch]]:
        self.sampler.start_step = self.step_in_epoch
        for batches in self.loader:
            self.step_in_epoch += 1
            yield batches
        self.step_in_epoch = 0
        self.sampler.start_step = 0

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])


class EvalSampleSet(Dataset):
    def __init__(self, index: SampleIndex, indices: list[int], image_size: int, mean, std):
        self.index = index
        self.indices = indices
        self.transform = augment.eval_transform(image_size, mean, std)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        sample = self.indices[position]
        blob, label = self.index.read(sample)
        return self.transform(decode(blob, self.index, sample)), label


class TorchvisionEvalData(EvalData):
    """Rank ``r`` evaluates samples ``r, r + W, r + 2W, ...``: no duplicates, no drops."""

    def __init__(self, index: SampleIndex, rank: int, world_size: int, image_size: int,
                 batch_size: int, num_workers: int, mean, std, pin_memory: bool = False):
        self.index = index
        indices = list(range(rank, len(index), world_size))
        self.dataset = EvalSampleSet(index, indices, image_size, mean, std)
        self.loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=False,
                                 num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=num_workers > 0)

    @property
    def num_samples(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.loader)
