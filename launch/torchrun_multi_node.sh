#!/usr/bin/env bash
# Start this node's share of a multi-node Lookaround training run through torchrun.
# Run it once on every node, with the same arguments.
#
# Usage:
#   launch/torchrun_multi_node.sh --nnodes N --rdzv-endpoint HOST:PORT \
#       [--rdzv-id ID] [--node-rank R] [--nproc N] [--max-restarts R] \
#       --config FILE [section.key=value ...] [--resume]
#
#   --nnodes N            number of nodes, or MIN:MAX for an elastic run.
#   --rdzv-endpoint H:P   address of the c10d rendezvous, served by the node at H. Pick
#                         a node of the run and a free port on it.
#   --rdzv-id ID          run id, the same on every node (default: lookaround).
#   --node-rank R         fix this node's rank (0 on the node at H). It switches to the
#                         static rendezvous, where node ranks are fixed and --nnodes must be
#                         one number. Without it, c10d numbers nodes as they join.
#   --nproc N             processes on this node (default: one per visible GPU). Without
#                         a GPU it is required, and the processes train on CPU with gloo.
#   --max-restarts R      times torchrun restarts all processes after a failure (default 0).
#   The trainer's options (--config, --resume, --dry-run, --world-size) and
#   section.key=value overrides go unchanged to the trainer (lookaround_dist.cli.train).
#   Any other --option is rejected before torchrun starts.
#
# Example, on each of two GPU nodes:
#   launch/torchrun_multi_node.sh --nnodes 2 --rdzv-endpoint node001:29500 \
#       --rdzv-id cifar10-run1 --config configs/cifar10.yaml
#
# Exit code: 0 when training finished, 85 when every process of this node saved a
# checkpoint and stopped on the preemption signal (rerun with --resume), 2 for an
# invalid option or when the trainer rejected its configuration, otherwise torchrun's
# exit code. Send SIGUSR1 to this script to forward the preemption signal
# to the training processes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

nnodes=""
rdzv_endpoint=""
rdzv_id="lookaround"
node_rank=""
nproc=""
max_restarts=0
parse_options "nnodes rdzv-endpoint rdzv-id node-rank nproc max-restarts" "$@"

if [[ -z "$nnodes" || -z "$rdzv_endpoint" ]]; then
    echo "error: --nnodes and --rdzv-endpoint are required (see --help)" >&2
    exit 2
fi
if [[ "$nnodes" =~ ^([1-9][0-9]*)(:([1-9][0-9]*))?$ ]]; then
    if [[ -n "${BASH_REMATCH[3]}" ]] && (( BASH_REMATCH[1] > BASH_REMATCH[3] )); then
        echo "error: --nnodes MIN:MAX needs MIN <= MAX, got '$nnodes'" >&2
        exit 2
    fi
else
    echo "error: --nnodes must be a positive integer N or MIN:MAX, got '$nnodes'" >&2
    exit 2
fi
if ! [[ "$rdzv_endpoint" =~ ^[^:]+:[0-9]+$ ]]; then
    echo "error: --rdzv-endpoint must be HOST:PORT, got '$rdzv_endpoint'" >&2
    exit 2
fi
check_max_restarts "$max_restarts"
nproc="$(resolve_nproc "$nproc")" || exit 2

rendezvous_options=()
if [[ -n "$node_rank" ]]; then
    if ! [[ "$nnodes" =~ ^[0-9]+$ ]]; then
        echo "error: --node-rank needs a fixed --nnodes, got '$nnodes'" >&2
        exit 2
    fi
    if ! [[ "$node_rank" =~ ^[0-9]+$ ]] || (( 10#$node_rank >= nnodes )); then
        echo "error: --node-rank must be an integer from 0 to $((nnodes - 1)), got '$node_rank'" >&2
        exit 2
    fi
    rendezvous_options=(--rdzv-backend=static --master-addr="${rdzv_endpoint%:*}"
        --master-port="${rdzv_endpoint##*:}" --node-rank="$node_rank")
else
    rendezvous_options=(--rdzv-backend=c10d --rdzv-endpoint="$rdzv_endpoint"
        --rdzv-id="$rdzv_id")
fi

set +e
run_torchrun "$nproc" \
    --nnodes="$nnodes" --nproc-per-node="$nproc" --max-restarts="$max_restarts" \
    "${rendezvous_options[@]}" \
    -- "${trainer_args[@]}"
exit $?
