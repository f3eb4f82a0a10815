"""Run the method comparison on CIFAR-10 and write its report.

    python scripts/run_experiment.py --data ../shared/data/cifar10 --output runs/experiment
    python scripts/run_experiment.py --smoke --output /tmp/experiment-smoke

ResNet-20, augmentations random crop + {hflip, vflip, randaugment} (one per branch, d = 3,
k = 5), and the methods lookaround, sgd, independent and lookahead, plus lookaround with
SWA over the last epochs, each with every seed. Every run reads the same data and takes
the same number of steps. Each run is one ``lookaround-train`` job under torchrun, in its
own run directory ``OUTPUT/<variant>-seed<N>``.

The script can be stopped and started again with the same arguments: finished runs
(``consensus.pt`` exists) are skipped, interrupted runs (``config.yaml`` exists) continue
from their latest checkpoint with ``--resume``. At the end, ``lookaround-report`` writes
``OUTPUT/report/report.md`` and its plots.

The default schedule trains on a subset, the first of the ten shuffled training shards
(5,000 images), for 5 epochs, and evaluates on the first test shard (5,000 images). All
ten runs took 61 minutes on two CPU cores (4 to 8.5 minutes each, depending on other
load). Change --epochs or --train-shards to fit another budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("run_experiment")
NUM_BRANCHES = 3


@dataclasses.dataclass(frozen=True)
class Variant:
    """One method and its own settings; ``name`` prefixes the run directories."""

    name: str
    method: str
    overrides: tuple[str, ...] = ()


def variants(epochs: int, swa_epochs: int, swa_lr: float) -> list[Variant]:
    return [
        Variant("lookaround", "lookaround"),
        Variant("sgd", "sgd"),
        Variant("independent", "independent"),
        Variant("lookahead", "lookahead"),
        Variant("lookaround-swa", "lookaround",
                (f"train.swa_epochs={min(swa_epochs, epochs)}", f"train.swa_lr={swa_lr}")),
    ]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10",
                        help="folder of the CIFAR-10 shards train-00000N.tar.gz and test-00000N.tar.gz "
                             "(default: %(default)s)")
    parser.add_argument("--output", default="runs/experiment", help="parent folder of the run directories")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every variant")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="variants to run (default: all): lookaround sgd independent lookahead lookaround-swa")
    parser.add_argument("--train-shards", type=int, default=1,
                        help="training shards of 5,000 images to use, of 10 (default: %(default)s)")
    parser.add_argument("--test-shards", type=int, default=1,
                        help="test shards of 5,000 images to evaluate on, of 2 (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="base-batch samples per branch and step (default: %(default)s)")
    parser.add_argument("--max-steps-per-epoch", type=int, default=0,
                        help="cap on steps per epoch, 0 for whole epochs (default: %(default)s)")
    parser.add_argument("--swa-epochs", type=int, default=2,
                        help="epochs averaged by the SWA variant (default: %(default)s)")
    parser.add_argument("--swa-lr", type=float, default=0.05,
                        help="constant learning rate of the SWA variant's averaging epochs (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=1,
                        help="torchrun processes per run; 1 hosts the three branches in turn (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per process (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps of every variant on one seed, to check the pipeline end to end")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides applied to every run, after the script's own")
    args = parser.parse_args(argv)

    if args.smoke:
        args.seeds = args.seeds[:1]
        args.epochs = 1
        args.max_steps_per_epoch = args.max_steps_per_epoch or 2
        args.batch_size = min(args.batch_size, 8)
        args.train_shards, args.test_shards = 1, 1
        args.swa_epochs = 1
    return args


def check_args(args) -> list[str]:
    """Return one message per invalid option, before any run starts (also for --dry-run)."""
    problems = []
    for name, value, least in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                               ("--swa-epochs", args.swa_epochs, 1), ("--processes", args.processes, 1),
                               ("--threads", args.threads, 1), ("--max-steps-per-epoch", args.max_steps_per_epoch, 0)):
        if value < least:
            problems.append(f"{name} must be >= {least}, found {value}")
    if args.swa_lr <= 0:
        problems.append(f"--swa-lr must be > 0, found {args.swa_lr}")
    if args.processes >= 1 and args.processes % NUM_BRANCHES and NUM_BRANCHES % args.processes:
        problems.append(f"--processes must divide or be a multiple of the {NUM_BRANCHES} branches "
                        f"(1, 3, 6, ...), found {args.processes}")
    folder = Path(args.data)
    for prefix, count, available in (("train", args.train_shards, 10), ("test", args.test_shards, 2)):
        if not 1 <= count <= available:
            problems.append(f"--{prefix}-shards must lie in [1, {available}], found {count}")
            continue
        missing = [f"{prefix}-{i:06d}.tar.gz" for i in range(count) if not (folder / f"{prefix}-{i:06d}.tar.gz").is_file()]
        if missing:
            problems.append(f"--data {folder}: shard(s) {', '.join(missing)} not found; pass the folder of "
                            f"the gzip-compressed CIFAR-10 shards (make experiment passes $SHARED_DATA/cifar10)")
    return problems


def check_overrides(args, chosen: list[Variant]) -> list[str]:
    """Return the configuration error of the first variant whose config does not load, if any."""
    from lookaround_dist.config import ConfigError, load_config

    for variant in chosen:
        try:
            load_config(REPO / "configs" / "cifar10.yaml", run_overrides(args, variant, 0, Path(args.output)))
        except ConfigError as error:
            return [f"{variant.name}: {error}"]
    return []


def shard_pattern(folder: Path, prefix: str, count: int) -> str:
    last = count - 1
    if last == 0:
        return str(folder / f"{prefix}-000000.tar.gz")
    return str(folder / f"{prefix}-{{000000..{last:06d}}}.tar.gz")


def run_overrides(args, variant: Variant, seed: int, output: Path) -> list[str]:
    """Return the run's overrides, one per key: the user's replace the script's own for the same key."""
    # Training runs in the repository folder, so relative paths are resolved here.
    folder = Path(args.data).resolve()
    overrides = [
        f"data.train_path={shard_pattern(folder, 'train', args.train_shards)}",
        f"data.val_path={shard_pattern(folder, 'test', args.test_shards)}",
        "data.backend=torchvision",  # reads the gzip-compressed shards in place, no decompressed copy
        f"data.batch_size={args.batch_size}",
        "data.num_workers=1",
        "data.augmentations=[hflip,vflip,randaugment]",
        f"lookaround.num_branches={NUM_BRANCHES}",
        "lookaround.k=5",
        "model.name=resnet20",
        f"train.epochs={args.epochs}",
        f"train.max_steps_per_epoch={args.max_steps_per_epoch}",
        f"train.seed={seed}",
        f"train.method={variant.method}",
        f"train.threads_per_rank={args.threads}",
        "train.device=cpu",
        f"train.output_dir={output}",
        f"train.run_name={variant.name}-seed{seed}",
        "train.keep_checkpoints=1",
        # Diversity every round and each branch's score every epoch, for the comparison.
        "train.diversity_interval_rounds=1",
        "train.evaluate_branches=true",
        "wandb.enabled=false",
        *variant.overrides,
        *args.overrides,
    ]
    by_key = {}
    for override in overrides:
        key = override.split("=", 1)[0]
        by_key.pop(key, None)  # so that a later value also moves the key to the end
        by_key[key] = override
    return list(by_key.values())


def run_state(run_dir: Path) -> str:
    """Return ``finished``, ``interrupted`` or ``new`` for a run directory."""
    if (run_dir / "consensus.pt").is_file():
        return "finished"
    if (run_dir / "config.yaml").is_file():
        return "interrupted"
    return "new"


def train_command(args, overrides: list[str], resume: bool) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(args.processes), "-m", "lookaround_dist.cli.train",
               "--config", str(REPO / "configs" / "cifar10.yaml")]
    if resume:
        command.append("--resume")
    return command + overrides


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    output = Path(args.output).resolve()
    problems = check_args(args)
    if problems:
        for problem in problems:
            log.error("invalid option: %s", problem)
        return 2
    chosen = variants(args.epochs, args.swa_epochs, args.swa_lr)
    if args.variants:
        unknown = sorted(set(args.variants) - {v.name for v in chosen})
        if unknown:
            log.error("unknown variant(s) %s; valid variants: %s", unknown, " ".join(v.name for v in chosen))
            return 2
        chosen = [v for v in chosen if v.name in args.variants]
    problems = check_overrides(args, chosen)
    if problems:
        log.error("invalid configuration: %s", problems[0])
        return 2

    environment = dict(os.environ, OMP_NUM_THREADS=str(args.threads), WANDB_MODE="disabled")
    run_dirs, failed = [], []
    for variant in chosen:
        for seed in args.seeds:
            run_dir = output / f"{variant.name}-seed{seed}"
            run_dirs.append(run_dir)
            state = run_state(run_dir)
            if state == "finished":
                log.info("%s: finished earlier, skipped", run_dir.name)
                continue
            command = train_command(args, run_overrides(args, variant, seed, output), state == "interrupted")
            log.info("%s: %s", run_dir.name, "resuming" if state == "interrupted" else "starting")
            if args.dry_run:
                print(shlex.join(command))
                continue
            output.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            with open(output / f"{run_dir.name}.log", "a") as log_file:
                result = subprocess.run(command, cwd=REPO, env=environment, stdout=log_file,
                                        stderr=subprocess.STDOUT)
            seconds = time.perf_counter() - started
            if result.returncode != 0:
                log.error("%s failed with exit code %d after %.0f s; see %s", run_dir.name,
                          result.returncode, seconds, output / f"{run_dir.name}.log")
                failed.append(run_dir.name)
                continue
            log.info("%s: exited after %.0f s, run %s", run_dir.name, seconds, run_state(run_dir))

    if args.dry_run:
        return 0
    finished = [d for d in run_dirs if run_state(d) == "finished"]
    if finished:
        # Labelled by directory, so that lookaround and lookaround-swa (same method) stay apart.
        report = [sys.executable, "-m", "lookaround_dist.cli.report", *map(str, finished),
                  "--output", str(output / "report"), "--label-by-directory"]
        subprocess.run(report, cwd=REPO, check=False)
    if failed:
        log.error("%d run(s) failed: %s; run the same command again to resume them", len(failed), ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
