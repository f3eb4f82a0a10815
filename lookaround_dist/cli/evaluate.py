"""``lookaround-eval``: top-1, top-5 and loss of a saved consensus, on one process or many.

    lookaround-eval runs/demo                       # the run's own config and consensus
    torchrun --nproc-per-node 4 -m lookaround_dist.cli.evaluate runs/demo data.val_path=...

The run directory's ``config.yaml`` supplies the model and the data; overrides change
it. Every validation sample is counted once over all ranks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from ..config import ConfigError, load_config
from ..data import build_eval_data, open_index, resolve_backend
from ..distributed import destroy, env_world, init_process_group, select_device
from ..evaluation import evaluate_model
from ..metrics import setup_logging
from ..models import build_model

log = logging.getLogger("lookaround_dist")


def state_dict_mismatch(expected: dict, found: dict) -> str:
    """Describe how state dict ``found`` differs from ``expected`` in keys and shapes ('' if it fits)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [f"{k} {tuple(found[k].shape)} instead of {tuple(expected[k].shape)}"
                for k in expected if k in found and found[k].shape != expected[k].shape]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped)):
        if keys:
            parts.append(f"{len(keys)} {label} (first: {keys[0]})")
    return "; ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="lookaround-eval",
        description="Measure test top-1, top-5 and loss of a saved consensus, on one process or many.",
        epilog="examples:\n"
               "  lookaround-eval runs/demo        # the run's own config.yaml and consensus.pt\n"
               "  torchrun --nproc-per-node 4 -m lookaround_dist.cli.evaluate runs/demo data.val_path=...\n\n"
               "Every validation sample is counted once over all ranks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="run directory holding config.yaml and consensus.pt")
    parser.add_argument("--weights", help="state dict to evaluate (default: RUN_DIR/consensus.pt)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="changes to the run's config, parsed as YAML values (data.val_path=...)")
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
    state = torch.load(weights, map_location=device, weights_only=True)
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        log.error("%s does not fit model %s with %d classes: %s", weights, config.model.name,
                  config.model.num_classes, problem)
        return 1
    model.load_state_dict(state)
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
