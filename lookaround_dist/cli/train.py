"""``lookaround-train``: one run from a YAML config and overrides, under torchrun."""

from __future__ import annotations

import argparse
import logging
import sys

from ..config import ConfigError, load_config
from ..distributed import destroy, env_world, restart_count
from ..metrics import setup_logging
from ..topology import TopologyError

log = logging.getLogger("lookaround_dist")

INVALID_CONFIG_EXIT_CODE = 2
"""Exit code of an invalid configuration or layout, which the launch scripts report as such."""

CONFIG_ERRORS = (ConfigError, TopologyError)
"""Errors that mean the configuration or the layout for this world size is invalid."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lookaround-train",
        description="Train d branches with Lookaround. Start one process per GPU with torchrun, "
                    "for example: torchrun --nproc-per-node 4 -m lookaround_dist.cli.train "
                    "--config configs/cifar10.yaml lookaround.num_branches=2",
    )
    parser.add_argument("--config", help="YAML run configuration (see configs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.output_dir/train.run_name from its latest "
                             "checkpoint (a run without checkpoints starts from the beginning); "
                             "implied for workers that torchrun restarts")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, the layout for --world-size, the model and the data, "
                             "print the run summary and exit without training")
    parser.add_argument("--world-size", type=int, default=None,
                        help="world size to check with --dry-run (default: WORLD_SIZE or 1)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, parsed as YAML values (command line > YAML > defaults); "
                             "they may stand before, between or after the options, and each key "
                             "may be given once")
    # Intermixed, so that overrides after an option are still overrides and not
    # "unrecognized arguments".
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, _, world_size = env_world()
    setup_logging(rank)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        log.error("invalid configuration: %s", error)
        return INVALID_CONFIG_EXIT_CODE
    if args.dry_run:
        from .dry_run import dry_run

        return dry_run(config, args.world_size if args.world_size is not None else world_size)

    from ..averaging import AveragingError
    from ..checkpoint import CheckpointError
    from ..distributed import CollectiveError
    from ..trainer import NonFiniteError, Trainer

    # Failures whose message names the fix. ValueError covers the data errors and the
    # checks of names and batch sizes before training.
    # NOTE: an unknown model or augmentation name and a base batch larger than the data
    # raise plain ValueError, so they exit 1 here although --dry-run reports them with 2.
    expected_errors = (ValueError, FileNotFoundError, FileExistsError, AveragingError,
                       CheckpointError, CollectiveError, NonFiniteError)

    # Workers that torchrun restarts (--max-restarts) continue from the latest checkpoint
    # of the same run directory without a human adding --resume.
    resume = args.resume
    if restart_count() > 0 and not resume:
        log.warning("torchrun restart %d: resuming from the latest checkpoint", restart_count())
        resume = True
    trainer = None
    try:
        trainer = Trainer(config, resume=resume)
        code = trainer.run()
    except CONFIG_ERRORS as error:
        log.error("invalid configuration: %s: %s", type(error).__name__, error)
        return INVALID_CONFIG_EXIT_CODE
    except expected_errors as error:
        log.error("%s: %s", type(error).__name__, error)
        return 1
    except RuntimeError as error:
        # Not one of the failures the trainer reports itself: keep the traceback.
        log.exception("unexpected error: %s", error)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
    destroy()
    return code


if __name__ == "__main__":
    sys.exit(main())
