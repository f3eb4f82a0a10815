"""Learning-rate schedules, stepped once per optimizer step: linear warm-up, then decay."""

from __future__ import annotations

import math
from typing import Callable

import torch


def lr_factor(schedule: str, total_steps: int, warmup_steps: int, steps_per_epoch: int,
              milestones: list, gamma: float) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    milestone_steps = [int(m) * steps_per_epoch for m in milestones]

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            span = max(1, total_steps - warmup_steps)
            progress = min(1.0, (step - warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "multistep":
            return gamma ** sum(step >= m for m in milestone_steps)
        return 1.0

    return factor


def build_optimizer(config, parameters) -> torch.optim.Optimizer:
    optim = config.optim
    if optim.name == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum,
                           weight_decay=optim.weight_decay, nesterov=optim.nesterov)


def build_scheduler(config, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    optim = config.optim
    total = steps_per_epoch * config.train.epochs
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))
    factor = lr_factor(optim.schedule, total, warmup, steps_per_epoch, optim.milestones, optim.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
