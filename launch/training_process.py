"""Run one training process for torchrun, forward signals to it and record its exit code.

torchrun treats every non-zero worker exit as a failure: it stops the other workers
(SIGTERM, then SIGKILL after its shutdown timeout), restarts the group when
``--max-restarts`` allows, and exits 1 itself. So the trainer's preemption exit code 85
would never reach the launch script, and a preempted rank could be killed while its
peers still write their checkpoint. This wrapper sits between torchrun and the trainer:

- it writes the trainer's exit code to ``$LOOKAROUND_EXIT_CODE_DIR/<LOCAL_RANK>.exit``
  and reports 85 to torchrun as 0, so the launch script can tell a preempted run from a
  failed one and torchrun neither tears down nor restarts the ranks that still save;
- it writes its own process id to ``<LOCAL_RANK>.pid`` in the same folder, so the launch
  script can send SIGUSR1 here (torchrun does not forward SIGUSR1);
- it forwards SIGUSR1, SIGTERM, SIGINT and SIGHUP to the trainer, each signal once,
  because under Slurm the same warning may arrive both from the scheduler and from the
  launch script.

Without ``LOOKAROUND_EXIT_CODE_DIR`` it only forwards signals and passes the exit code
through unchanged.

Usage (the launch scripts do this): ``torchrun ... training_process.py MODULE [ARG ...]``
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# Must equal lookaround_dist.preemption.PREEMPTED_EXIT_CODE. Importing it here would
# import torch in this extra process per rank, so the value is repeated and a test
# compares the two.
PREEMPTED_EXIT_CODE = 85

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def shell_exit_code(returncode: int) -> int:
    """Return a Popen return code as a shell reports it (128 + N for death by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: training_process.py MODULE [ARG ...]", file=sys.stderr)
        return 2
    module, *module_args = argv
    local_rank = os.environ.get("LOCAL_RANK", "0")
    exit_code_dir = os.environ.get("LOOKAROUND_EXIT_CODE_DIR")

    # The trainer starts with SIGUSR1 ignored, so an early warning that arrives before
    # it has installed its handler cannot kill it; setting a handler replaces the ignore.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    trainer = subprocess.Popen([sys.executable, "-m", module, *module_args])

    forwarded: set[int] = set()

    def forward(signum: int, _frame) -> None:
        if signum in forwarded:
            return
        forwarded.add(signum)
        if trainer.poll() is None:
            trainer.send_signal(signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    if exit_code_dir:
        Path(exit_code_dir, f"{local_rank}.pid").write_text(f"{os.getpid()}\n")

    exit_code = shell_exit_code(trainer.wait())

    if not exit_code_dir:
        return exit_code
    Path(exit_code_dir, f"{local_rank}.exit").write_text(f"{exit_code}\n")
    return 0 if exit_code == PREEMPTED_EXIT_CODE else exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
