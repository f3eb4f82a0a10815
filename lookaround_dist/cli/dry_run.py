"""``lookaround-train --dry-run``: check a run before it waits in a queue.

Runs every check the trainer runs before its first collective, for a given world size,
in one process and without a process group. These cover the layout of ranks to
branches, model and augmentation names, the data paths, every label, and the shard
count for DALI. It also
builds the model, passes a small batch through it at ``data.image_size``, and decodes
the first training and validation image. Then it prints the run summary.

Exit code 0 when the run can start, 2 when a check failed (the same code as an invalid
configuration), with the reason logged.
"""

from __future__ import annotations

import collections
import logging
import math

import torch

from ..data import DataError, SampleIndex
from ..data.sources import expand_shards, is_image_folder
from ..data.torchvision_backend import decode
from ..methods import SINGLE_MODEL_METHODS
from ..models import build_model
from ..topology import Layout, TopologyError

log = logging.getLogger("lookaround_dist")

INVALID_EXIT_CODE = 2
"""Exit code of a failed dry run, as for any invalid configuration (see docs/launch.md)."""

CHECK_BATCH = 2
"""Images in the batch passed through the model to check that it accepts the image size."""


def dry_run(config, world_size: int) -> int:
    """Check ``config`` for ``world_size`` ranks, print the run summary and return the exit code."""
    from ..trainer import preflight

    try:
        layout, backend, train_index, val_index = preflight(config, world_size, rank=0)
        model = build_model(config.model.name, config.model.num_classes, config.data.image_size,
                            config.model.weights_path)
        check_forward(model, config.data.image_size, config.model.num_classes)
        decode(train_index.read(0)[0], train_index, 0)
        if val_index is not None:
            decode(val_index.read(0)[0], val_index, 0)
    # AssertionError: torchvision models check their arguments with asserts (a ViT's
    # image size that is not a multiple of its patch size).
    except (TopologyError, DataError, ValueError, RuntimeError, FileNotFoundError, AssertionError) as error:
        log.error("dry run failed: %s: %s", type(error).__name__, error)
        return INVALID_EXIT_CODE

    files = count_files(config.data.train_path)
    warn_about_data(config, layout, train_index, files)
    for line in summary_lines(config, layout, backend, model, train_index, val_index, files):
        print(line)
    return 0


@torch.no_grad()
def check_forward(model: torch.nn.Module, image_size: int, num_classes: int) -> None:
    """Raise RuntimeError unless the model maps a batch at ``image_size`` to ``num_classes`` logits."""
    model.eval()
    try:
        logits = model(torch.zeros(CHECK_BATCH, 3, image_size, image_size))
    except RuntimeError as error:
        raise RuntimeError(f"the model does not accept {image_size} x {image_size} px input "
                           f"(data.image_size={image_size}): {error}") from None
    if tuple(logits.shape) != (CHECK_BATCH, num_classes):
        raise RuntimeError(f"the model returns logits of shape {tuple(logits.shape)}, expected "
                           f"({CHECK_BATCH}, {num_classes}) for model.num_classes={num_classes}")


def count_files(path: str) -> tuple[str, int]:
    """Return the kind of the data set (shards or ImageFolder) and its number of shard files
    (-1 for an ImageFolder tree)."""
    if is_image_folder(path):
        return "ImageFolder", -1
    return "shards", len(expand_shards(path))


def steps_per_epoch(config, layout: Layout, num_samples: int) -> int:
    """Steps per epoch as the input backends compute them."""
    base_batch = config.data.batch_size * layout.ranks_per_branch
    if config.data.last_batch == "drop":
        steps = num_samples // base_batch
    else:
        steps = math.ceil(num_samples / base_batch)
    if config.train.max_steps_per_epoch:
        steps = min(steps, config.train.max_steps_per_epoch)
    return steps


def warn_about_data(config, layout: Layout, train_index: SampleIndex, files: tuple[str, int]) -> None:
    """Log the data problems that do not stop a run."""
    kind, num_files = files
    readers = layout.ranks_per_branch * max(1, config.data.num_workers)
    if kind == "shards" and num_files < readers:
        # NOTE: neither backend here loses samples with few shards, because torchvision
        # reads samples by index and DALI splits the sample sequence. Loaders that hand
        # whole shards to each worker (webdataset's streaming pipelines) would.
        log.warning(
            "%d training shard(s) for %d reader(s) (%d rank(s) per branch x %d loader worker(s) "
            "each): a loader that gives every worker its own shards would leave workers idle; "
            "write at least %d shards (lookaround-shards pack --samples-per-shard)",
            num_files, readers, layout.ranks_per_branch, max(1, config.data.num_workers), readers,
        )
    present = len({sample.label for sample in train_index.samples})
    if present < config.model.num_classes:
        log.warning("the training data contains labels of %d of model.num_classes=%d classes",
                    present, config.model.num_classes)


def summary_lines(config, layout: Layout, backend: str, model: torch.nn.Module,
                  train_index: SampleIndex, val_index, files: tuple[str, int]) -> list[str]:
    """Return the run summary (method and layout, model, data, schedule) as lines to print."""
    parameters = sum(p.numel() for p in model.parameters())
    steps = steps_per_epoch(config, layout, len(train_index))
    labels = collections.Counter(sample.label for sample in train_index.samples)
    kind, num_files = files
    single_model = config.train.method in SINGLE_MODEL_METHODS

    lines = [f"dry run: the configuration is valid for world size W={layout.world_size}"]
    lines += single_model_lines(config, layout) if single_model else branch_lines(config, layout)
    lines.append(f"  model {config.model.name}: {parameters:,} parameters, {config.model.num_classes} classes, "
                 f"input {config.data.image_size} px")

    lines.append(f"  data backend {backend}: {len(train_index)} training samples, labels "
                 f"{min(labels)}..{max(labels)} ({len(labels)} of {config.model.num_classes} classes "
                 f"present); {len(val_index) if val_index is not None else 0} validation samples")
    # Each rank of a branch reads a disjoint share of every base batch, and the ranks at
    # the same position in the other branches read the same samples. The one model of
    # sgd and lookahead is a branch over all ranks.
    shards_per_rank = num_files / layout.ranks_per_branch
    if kind == "shards" and single_model:
        lines.append(f"  training shards: {num_files} file(s), {shards_per_rank:.1f} per rank "
                     f"({layout.world_size} rank(s) read disjoint shares of each base batch)")
    elif kind == "shards":
        lines.append(f"  training shards: {num_files} file(s), {shards_per_rank:.1f} per rank of a branch "
                     f"({layout.ranks_per_branch} rank(s) per branch)")
    else:
        lines.append(f"  training data: {kind} tree, samples read by index")

    base_batch = config.data.batch_size * layout.ranks_per_branch
    if single_model:
        augmentations = config.lookaround.num_branches
        per_rank = (f"batch {config.data.batch_size} per rank and augmentation, "
                    f"{config.data.batch_size * augmentations} images per rank and step "
                    f"({augmentations} augmentations)")
    else:
        per_rank = f"batch {config.data.batch_size} per rank and branch"
    lines.append(f"  {per_rank}, base batch {base_batch}, "
                 f"{steps} steps per epoch ({config.data.last_batch} last batch), "
                 f"{config.train.epochs} epochs")
    lines.append(f"  optimizer {config.optim.name} lr {config.optim.lr} ({config.optim.schedule}, "
                 f"{config.optim.warmup_epochs} warm-up epochs)")
    return lines


def branch_lines(config, layout: Layout) -> list[str]:
    """Return the summary lines of lookaround and independent: the branches, their
    augmentations and ranks, and what happens every k steps."""
    method = config.train.method
    lines = [
        f"  method {method}: branches d={layout.num_branches}, k={config.lookaround.k}: "
        f"{layout.ranks_per_branch} rank(s) per branch, {layout.branches_per_rank} branch(es) per rank",
    ]
    for branch in range(layout.num_branches):
        lines.append(f"  branch {branch}: augmentation {config.data.augmentations[branch]}, "
                     f"ranks {list(layout.branch_ranks(branch))}")
    if method == "independent":
        lines.append("  branches never averaged: each is evaluated alone and in a logit ensemble")
    else:
        lines.append(f"  peer groups (average step): {[list(group) for group in layout.all_peer_groups()]}")
    return lines


def single_model_lines(config, layout: Layout) -> list[str]:
    """Return the summary lines of sgd and lookahead: one model that trains on the d
    augmentations of each base batch, and what happens every k steps."""
    augmentations = config.data.augmentations
    ranks = list(range(layout.world_size))
    lines = [
        f"  method {config.train.method}: one model trained on all d={len(augmentations)} "
        f"augmentations ({', '.join(augmentations)}) of each base batch, DDP over ranks {ranks}",
    ]
    every_k = f"  every k={config.lookaround.k} steps: "
    if config.train.method == "lookahead":
        every_k += (f"the slow weights move alpha={config.train.lookahead_alpha} of the way to the "
                    f"fast weights, which restart from them; ")
    lines.append(every_k + f"BatchNorm statistics averaged over all {layout.world_size} rank(s)")
    return lines
