#!/usr/bin/env bash
# Install Slurm (controller, node daemon, client commands) and munge from Debian/Ubuntu
# packages, for the tests that start a single-node cluster (tests/slurm_cluster.py).
# Idempotent: does nothing when every program is already installed. Needs root.
# The packages try to start their services, which fails without systemd; the tests
# start the daemons themselves.
set -euo pipefail

programs=(munged slurmctld slurmd sbatch squeue scontrol)
missing=()
for program in "${programs[@]}"; do
    command -v "$program" >/dev/null 2>&1 || missing+=("$program")
done
if (( ${#missing[@]} == 0 )); then
    echo "Slurm and munge are already installed: $(slurmctld -V)"
    exit 0
fi

if (( EUID != 0 )); then
    echo "error: missing ${missing[*]}; installing them needs root (run with sudo)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing ${missing[*]} and apt-get not found; install Slurm and munge with this system's package manager" >&2
    exit 1
fi

echo "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
echo "installed: $(slurmctld -V)"
