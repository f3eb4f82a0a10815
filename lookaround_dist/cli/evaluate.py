"""``lookaround-eval``: top-1, top-5 and loss of a saved consensus, on one process or many.

    lookaround-eval runs/demo                       # the run's own config and consensus
    torchrun --nproc-per-node 4 -m lookaround_dist.cli.evaluate runs/demo data.val_path=...

The run directory's ``config.yaml`` supplies the model and the data; overrides change
it. Every validation sample is counted once over all ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import ConfigError, load_config
from ..data import build_eval_data, open_index, resolve_backend
from ..distributed import destroy, env_world, init_process_group, select_device
from ..metrics import setup_logging
from ..models import build_model

log = logging.getLogger("lookaround_dist")


@torch.no_grad()
def evaluate_model(model, data, device, amp_dtype=None, memory_format=torch.contiguous_format) -> dict:
    """Sum loss and top-1/top-5 hits over this rank's share, reduce over all ranks."""
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
        dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    if int(count) != data.num_samples:
        raise RuntimeError(f"evaluation counted {int(count)} samples, expected {data.num_samples}")
    return {"test_top1": 100.0 * top1 / count, "test_top5": 100.0 * top5 / count,
            "test_loss": loss / count, "samples": int(count)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lookaround-eval", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run directory holding config.yaml and consensus.pt")
    parser.add_argument("--weights", help="state dict to evaluate (default: RUN_DIR/consensus.pt)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    rank, local_rank, world_size = env_world()
    setup_logging(rank)

    run_dir = Path(args.run_dir)
    weights = Path(args.weights) if args.weights else run_dir / "consensus.pt"
    try:
        config = load_config(run_dir / "config.yaml", args.overrides)
    except ConfigError as error:
        log.error("invalid configuration: %s", error)
        return 2
    if not weights.is_file():
        log.error("weights not found: %s (a run writes consensus.pt when it finishes)", weights)
        return 1
    if not config.data.val_path:
        log.error("no validation data: set data.val_path=...")
        return 1

    index = open_index(config.data.val_path, config.model.num_classes)
    device = select_device(config.train.device, local_rank)
    init_process_group(device, config.train.timeout_seconds)
    model = build_model(config.model.name, config.model.num_classes, config.data.image_size).to(device)
    model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    backend = resolve_backend(config.data.backend)
    data = build_eval_data(config, index, rank, world_size, device, backend)
    result = evaluate_model(model, data, device)
    data.close()
    if rank == 0:
        print(json.dumps({"weights": str(weights), **result}))
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
