#!/usr/bin/env bash
# Start one Lookaround training run on this machine through torchrun.
#
# Usage:
#   launch/torchrun_single_node.sh [--nproc N] [--max-restarts R] \
#       --config FILE [section.key=value ...] [--resume]
#
#   --nproc N         processes to start (default: one per visible GPU). Without a GPU
#                     it is required, and the N processes train on CPU with gloo.
#   --max-restarts R  times torchrun restarts all processes after a failure (default 0).
#   The trainer's options (--config, --resume, --dry-run, --world-size) and
#   section.key=value overrides go unchanged to the trainer (lookaround_dist.cli.train).
#   Any other --option is rejected before torchrun starts.
#
# Examples:
#   launch/torchrun_single_node.sh --config configs/cifar10.yaml
#   launch/torchrun_single_node.sh --nproc 3 --config configs/demo.yaml train.epochs=1
#
# Exit code: 0 when training finished, 85 when it saved a checkpoint and stopped on the
# preemption signal (rerun with --resume), 2 for an invalid option or when the trainer
# rejected its configuration, otherwise torchrun's exit code. Send SIGUSR1
# to this script to forward the preemption signal to the training processes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

nproc=""
max_restarts=0
parse_options "nproc max-restarts" "$@"
check_max_restarts "$max_restarts"
nproc="$(resolve_nproc "$nproc")" || exit 2

set +e
run_torchrun "$nproc" \
    --standalone --nnodes=1 --nproc-per-node="$nproc" --max-restarts="$max_restarts" \
    -- "${trainer_args[@]}"
exit $?
