"""Distributed evaluation: top-1, top-5 and loss, every validation sample counted once."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import collective


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, data, device: torch.device,
                   amp_dtype: Optional[torch.dtype] = None,
                   memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """Evaluate ``model`` on this rank's share of ``data``, then sum over all ranks.

    Leaves ``model`` in eval mode. Raises RuntimeError when the ranks together counted
    another number of samples than ``data.num_samples``.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for images, labels in data:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(dim=1).sum()
        totals[3] += labels.numel()
    if dist.is_available() and dist.is_initialized():
        with collective("the evaluation all-reduce"):
            dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    if int(count) != data.num_samples:
        raise RuntimeError(f"evaluation counted {int(count)} samples, expected {data.num_samples}")
    return {"test_top1": 100.0 * top1 / count, "test_top5": 100.0 * top5 / count,
            "test_loss": loss / count, "samples": int(count)}
