"""Augmentations by name for the torchvision backend, on top of each data set's base crop.

The base crop depends on the image size: a padded random crop (4 pixels of zero padding)
for 32 px data, a random-resized crop for ImageNet-size data. Each branch adds one named
augmentation. The DALI backend implements the same names with the same meaning.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

SMALL_IMAGE_MAX = 64
"""Image sizes up to this use the padded random crop and no resize at validation."""

CROP_PADDING = 4
ROTATE_DEGREES = 15.0
RESIZE_RATIO = 256 / 224
"""Validation resizes the shorter side to image_size * 256 / 224, then center-crops."""

AUGMENTATIONS = ("none", "hflip", "vflip", "rotate", "randaugment", "autoaugment", "trivialaugment")


def check_augmentations(names: Sequence[str], valid: Sequence[str] = AUGMENTATIONS, backend: str = "torchvision") -> None:
    """Raise ValueError naming every unknown augmentation and listing the valid ones."""
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(
            f"unknown augmentation(s) {', '.join(map(repr, unknown))} for the {backend} backend; "
            f"valid names: {', '.join(valid)}"
        )


def augmentation(name: str) -> v2.Transform:
    """The branch augmentation called ``name``, applied to a uint8 image tensor."""
    check_augmentations([name])
    if name == "none":
        return v2.Identity()
    if name == "hflip":
        return v2.RandomHorizontalFlip(p=0.5)
    if name == "vflip":
        return v2.RandomVerticalFlip(p=0.5)
    if name == "rotate":
        return v2.RandomRotation(ROTATE_DEGREES)
    if name == "randaugment":
        return v2.RandAugment()
    if name == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    return v2.TrivialAugmentWide()


def base_crop(image_size: int) -> v2.Transform:
    if image_size <= SMALL_IMAGE_MAX:
        return v2.RandomCrop(image_size, padding=CROP_PADDING)
    return v2.RandomResizedCrop(image_size, antialias=True)


def normalize(mean: Sequence[float], std: Sequence[float]) -> v2.Transform:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def train_transform(name: str, image_size: int, mean, std) -> v2.Transform:
    """Base crop, then the branch's augmentation, then scaling to float and normalization."""
    return v2.Compose([base_crop(image_size), augmentation(name), normalize(mean, std)])


def eval_transform(image_size: int, mean, std) -> v2.Transform:
    """Deterministic validation transform: resize and center crop for large images."""
    if image_size <= SMALL_IMAGE_MAX:
        steps = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    else:
        steps = [v2.Resize(round(image_size * RESIZE_RATIO), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(steps + [normalize(mean, std)])
