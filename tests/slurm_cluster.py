"""A real single-node Slurm cluster for tests, started in a temporary folder.

``SlurmCluster`` starts its own munged (as the ``munge`` user, on a private socket),
slurmctld and slurmd on free loopback ports, waits until the node is idle, and stops the
three daemons by their process ids on exit. Client commands run through
``SlurmCluster.run`` or with ``SlurmCluster.env``, which points ``SLURM_CONF`` at the
cluster's own slurm.conf, so the system's Slurm configuration and any other test cluster
on the same machine are left alone.

Needs root (the daemons and munged's key) and the Debian packages slurmctld, slurmd,
slurm-client and munge (``scripts/install_slurm.sh``). The ``slurm_cluster`` fixture
skips the test, with the reason, when they are missing or the cluster does not come up.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_slurm.sh"
SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
SYSTEM_MUNGE_KEY = Path("/etc/munge/munge.key")


class SlurmUnavailable(RuntimeError):
    """Slurm or munge cannot be installed or started on this machine."""


def _free_port() -> int:
    # Another process could take the port before the daemon binds it. That shows up
    # as a start-up failure, not as a wrong result.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _free_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise SlurmUnavailable("MemAvailable not found in /proc/meminfo")


def ensure_slurm_installed() -> None:
    """Install Slurm and munge with scripts/install_slurm.sh when a program is missing."""
    if all(shutil.which(program) for program in SLURM_PROGRAMS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        raise SlurmUnavailable(
            f"{INSTALL_SCRIPT.name} failed with exit code {result.returncode}:\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    missing = [program for program in SLURM_PROGRAMS if not shutil.which(program)]
    if missing:
        raise SlurmUnavailable(f"still missing after installation: {', '.join(missing)}")


class SlurmCluster:
    """One Slurm node on 127.0.0.1 with its own controller, daemons and state folder."""

    def __init__(self, root: Optional[Path] = None, start_timeout_seconds: float = 60.0):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="slurm-cluster-"))
        self.start_timeout_seconds = start_timeout_seconds
        self.node_name = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf_path = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._daemons: dict[str, subprocess.Popen] = {}
        self._log_files: list = []

    # Environment and client commands.

    @property
    def env(self) -> dict[str, str]:
        """The process environment for Slurm client commands aimed at this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf_path)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster and return its result."""
        result = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed with exit code {result.returncode}: "
                f"{result.stderr.strip()}"
            )
        return result

    def submit(self, *sbatch_args: str) -> int:
        """Submit a batch job with sbatch and return its job id."""
        output = self.run("sbatch", "--parsable", *sbatch_args).stdout.strip()
        return int(output.split(";")[0])

    def job_fields(self, job_id: int) -> dict[str, str]:
        """Return the key=value fields of ``scontrol show job``, or {} once the job is purged."""
        result = self.run("scontrol", "--oneliner", "show", "job", str(job_id), check=False)
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def wait_for_job(self, job_id: int, states: tuple[str, ...], timeout_seconds: float) -> dict[str, str]:
        """Poll until the job reaches one of ``states`` and return its fields.

        Raises TimeoutError with the last state and the daemon logs' tails otherwise.
        """
        deadline = time.monotonic() + timeout_seconds
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.job_fields(job_id)
            if fields.get("JobState") in states:
                return fields
            time.sleep(1.0)
        raise TimeoutError(
            f"job {job_id} did not reach {'/'.join(states)} within {timeout_seconds:.0f} s; "
            f"last fields: {fields}\n{self.log_tails()}"
        )

    def log_tails(self, max_chars: int = 3000) -> str:
        """Return the end of each daemon log, for failure messages."""
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            path = self.root / "log" / f"{name}.log"
            if path.exists():
                parts.append(f"--- {name}.log ---\n{path.read_text(errors='replace')[-max_chars:]}")
        return "\n".join(parts)

    # Start and stop.

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        """Write the configuration, start munged, slurmctld and slurmd, wait for an idle node."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting Slurm daemons needs root")
        ensure_slurm_installed()
        self._make_folders()
        self._start_munged()
        self._write_slurm_conf()
        self._start_daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf_path)])
        self._start_daemon("slurmd", ["slurmd", "-D", "-f", str(self.conf_path), "-N", self.node_name])
        self._wait_for_idle_node()

    def stop(self) -> None:
        """Stop slurmd, slurmctld and munged by their process ids, then remove the folder."""
        for name in ("slurmd", "slurmctld", "munged"):
            process = self._daemons.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        for log_file in self._log_files:
            log_file.close()
        self._log_files.clear()
        if os.environ.get("LOOKAROUND_KEEP_SLURM_CLUSTER") != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    def _make_folders(self) -> None:
        # munged runs as the munge user, which must reach its own folder through root's.
        self.root.chmod(0o755)
        for name in ("log", "state", "spool", "munge"):
            (self.root / name).mkdir(exist_ok=True)
        munge_user = pwd.getpwnam("munge")
        munge_dir = self.root / "munge"
        munge_dir.chmod(0o700)
        if not SYSTEM_MUNGE_KEY.exists():
            raise SlurmUnavailable(f"munge key {SYSTEM_MUNGE_KEY} not found; reinstall munge")
        shutil.copyfile(SYSTEM_MUNGE_KEY, munge_dir / "munge.key")
        (munge_dir / "munge.key").chmod(0o600)
        for path in (munge_dir, munge_dir / "munge.key"):
            os.chown(path, munge_user.pw_uid, munge_user.pw_gid)

    def _start_munged(self) -> None:
        munge_dir = self.root / "munge"
        munge_user = pwd.getpwnam("munge")
        command = [
            "munged", "--foreground", "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={munge_dir / 'munge.key'}",
            f"--pid-file={munge_dir / 'munged.pid'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
            f"--log-file={munge_dir / 'munged.log'}",
        ]
        self._start_daemon("munged", command, user=munge_user)

        deadline = time.monotonic() + self.start_timeout_seconds
        while time.monotonic() < deadline:
            check = subprocess.run(
                f"munge -n -S {self.munge_socket} | unmunge -S {self.munge_socket}",
                shell=True, capture_output=True, text=True,
            )
            if check.returncode == 0:
                return
            self._raise_if_exited("munged")
            time.sleep(0.2)
        raise SlurmUnavailable(f"munged did not respond on {self.munge_socket}: {check.stderr.strip()}")

    def _write_slurm_conf(self) -> None:
        # RealMemory must not exceed what slurmd finds free, or the node is drained.
        real_memory_mb = max(256, int(_free_memory_mb() * 0.8))
        lines = [
            "ClusterName=lookaround-test",
            f"SlurmctldHost={self.node_name}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A short credential lifetime lets a requeued job start again within about
            # a minute instead of about two minutes (measured with Slurm 22.05).
            f"AuthInfo=cred_expire=10,socket={self.munge_socket}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "MpiDefault=none",
            "MailProg=/bin/true",
            # pgid tracking ends a job's background processes with the job.
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobRequeue=1",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "KillWait=30",
            f"NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={real_memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _start_daemon(self, name: str, command: list[str], user: Optional[pwd.struct_passwd] = None) -> None:
        log_file = open(self.root / "log" / f"{name}.log", "ab")
        self._log_files.append(log_file)
        kwargs = {}
        if user is not None:
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        self._daemons[name] = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True, **kwargs,
        )

    def _raise_if_exited(self, name: str) -> None:
        process = self._daemons.get(name)
        if process is not None and process.poll() is not None:
            raise SlurmUnavailable(
                f"{name} exited with code {process.returncode} during start-up\n{self.log_tails()}"
            )

    def _wait_for_idle_node(self) -> None:
        deadline = time.monotonic() + self.start_timeout_seconds
        state = ""
        while time.monotonic() < deadline:
            self._raise_if_exited("slurmctld")
            self._raise_if_exited("slurmd")
            result = self.run("sinfo", "--noheader", "--format=%T", check=False)
            state = result.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise SlurmUnavailable(
            f"node {self.node_name} not idle after {self.start_timeout_seconds:.0f} s "
            f"(state {state!r})\n{self.log_tails()}"
        )


@pytest.fixture
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node cluster; skips the test when Slurm cannot be installed or started."""
    try:
        cluster = SlurmCluster()
        cluster.__enter__()
    except SlurmUnavailable as error:
        pytest.skip(f"no local Slurm cluster: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()
