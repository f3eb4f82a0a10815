"""``lookaround-train --dry-run``: check a run before it waits in a queue.

Runs every check the trainer runs before its first collective, for a given world size,
in one process and without a process group, then prints the run summary.
"""

from __future__ import annotations

import logging

from ..data.sources import DataError
from ..models import build_model
from ..topology import Layout, TopologyError

log = logging.getLogger("lookaround_dist")


def dry_run(config, world_size: int) -> int:
    from ..trainer import preflight

    try:
        layout, backend, train_index, val_index = preflight(config, world_size, rank=0)
        model = build_model(config.model.name, config.model.num_classes, config.data.image_size)
    except (TopologyError, DataError, ValueError, RuntimeError, FileNotFoundError) as error:
        log.error("dry run failed: %s", error)
        return 1
    parameters = sum(p.numel() for p in model.parameters())
    global_batch = config.data.batch_size * layout.ranks_per_branch
    steps = len(train_index) // global_batch if config.data.last_batch == "drop" else -(-len(train_index) // global_batch)
    if config.train.max_steps_per_epoch:
        steps = min(steps, config.train.max_steps_per_epoch)
    shards = sorted({s.source for s in train_index.samples})
    print(f"dry run: the configuration is valid for world size W={world_size}")
    print(f"  branches d={layout.num_branches}, k={config.lookaround.k}: "
          f"{layout.ranks_per_branch} rank(s) per branch, {layout.branches_per_rank} branch(es) per rank")
    for b in range(layout.num_branches):
        print(f"  branch {b}: augmentation {config.data.augmentations[b]}, ranks {list(Layout(world_size, layout.num_branches, 0).branch_ranks(b))}")
    print(f"  model {config.model.name}: {parameters:,} parameters, {config.model.num_classes} classes")
    print(f"  data backend {backend}: {len(train_index)} training samples in {len(shards)} file(s), "
          f"labels within 0..{config.model.num_classes - 1}; "
          f"{len(val_index) if val_index is not None else 0} validation samples")
    print(f"  batch {config.data.batch_size} per rank and branch, base batch {global_batch}, "
          f"{steps} steps per epoch, {config.train.epochs} epochs")
    return 0
