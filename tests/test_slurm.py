"""The launch path from launch/slurm/lookaround.sbatch down to the training processes.

Layers:
- the node launch script on its own, with a stand-in trainer: exit codes and SIGUSR1;
- a real single-node Slurm cluster (tests/slurm_cluster.py): a trivial job, then the
  batch script with the stand-in trainer (forwarding, requeue, --resume);
- the batch script with the real trainer on the demo subset on CPU (gloo): a complete
  run, and a run preempted mid-epoch that must end with the same consensus weights,
  bit for bit, as an uninterrupted run.

The Slurm tests skip, with the reason, only when Slurm cannot be installed or started.
Measured on a 2-core machine without GPU: about 30 s for the tests that are not marked
slow; about 70 s (stand-in requeue), 145 s (demo run) and 285 s (preemption) for the rest.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port
from slurm_cluster import REPO_ROOT, SlurmCluster, slurm_cluster  # noqa: F401 (fixture)

SBATCH_SCRIPT = REPO_ROOT / "launch" / "slurm" / "lookaround.sbatch"
SINGLE_NODE_SCRIPT = REPO_ROOT / "launch" / "torchrun_single_node.sh"
MULTI_NODE_SCRIPT = REPO_ROOT / "launch" / "torchrun_multi_node.sh"
TRAINING_PROCESS = REPO_ROOT / "launch" / "training_process.py"
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
PREEMPTED_EXIT_CODE = 85

# A trainer stand-in: it prints its arguments, and on SIGUSR1 it writes a marker file
# (a "checkpoint") and exits 85, like the real trainer's preemption contract. Without the
# signal it exits STAND_IN_EXIT_CODE after STAND_IN_SECONDS (STAND_IN_SECONDS_RANK_<r> on
# rank r).
STAND_IN_TRAINER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path

    stop = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: stop.append(signum))
    marker_dir = Path(os.environ["STAND_IN_MARKER_DIR"])
    rank = os.environ["RANK"]
    print(f"stand-in rank {rank} args {sys.argv[1:]}", flush=True)
    (marker_dir / f"started-{rank}").write_text("")
    seconds = os.environ.get(f"STAND_IN_SECONDS_RANK_{rank}", os.environ.get("STAND_IN_SECONDS", "5"))
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        if stop:
            (marker_dir / f"checkpoint-{rank}").write_text("")
            sys.exit(85)
        time.sleep(0.1)
    sys.exit(int(os.environ.get("STAND_IN_EXIT_CODE", "0")))
    """
)

# The demo run for the trainer tests: short, but with several rounds per epoch, so a
# signal after the first epoch's checkpoint stops the run mid-epoch.
DEMO_OVERRIDES = ["train.epochs=3", "train.max_steps_per_epoch=10", "train.device=cpu"]


def _launch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Return an environment with this interpreter's torchrun first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    return env


def _stand_in_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Return a launch environment whose trainer module is the stand-in."""
    module_dir = tmp_path / "stand_in"
    module_dir.mkdir(exist_ok=True)
    (module_dir / "stand_in_trainer.py").write_text(STAND_IN_TRAINER)
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir(exist_ok=True)
    return _launch_env(
        tmp_path,
        PYTHONPATH=str(module_dir),
        LOOKAROUND_TRAIN_MODULE="stand_in_trainer",
        STAND_IN_MARKER_DIR=str(marker_dir),
        **extra,
    )


def _run_single_node(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the single-node script with two processes and a stand-in config, to its end."""
    return subprocess.run(
        ["bash", str(SINGLE_NODE_SCRIPT), "--nproc", "2", "--config", "x.yaml"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=100,
    )


def _wait_for_files(paths: list[Path], timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not all(path.exists() for path in paths):
        if time.monotonic() > deadline:
            missing = [str(path) for path in paths if not path.exists()]
            raise TimeoutError(f"files not created within {timeout_seconds:.0f} s: {missing}")
        time.sleep(0.2)


def _assert_state_dicts_equal(expected: dict, found: dict) -> None:
    assert sorted(found) == sorted(expected)
    for key, tensor in expected.items():
        assert found[key].dtype == tensor.dtype, key
        assert torch.equal(found[key], tensor), f"{key} differs"


# Node launch script without Slurm.


@pytest.mark.timeout(30)
def test_exit_code_matches_trainer():
    # Read from the source, because importing the package needs it installed.
    preemption_source = (REPO_ROOT / "lookaround_dist" / "preemption.py").read_text()
    match = re.search(r"^PREEMPTED_EXIT_CODE = (\d+)", preemption_source, re.MULTILINE)
    assert match, "PREEMPTED_EXIT_CODE not found in lookaround_dist/preemption.py"
    assert int(match.group(1)) == PREEMPTED_EXIT_CODE
    assert f"PREEMPTED_EXIT_CODE = {PREEMPTED_EXIT_CODE}" in TRAINING_PROCESS.read_text()
    assert f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}" in (REPO_ROOT / "launch" / "common.sh").read_text()
    assert f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}" in SBATCH_SCRIPT.read_text()


@pytest.mark.timeout(120)
def test_node_script_passes_arguments(tmp_path):
    env = _stand_in_env(tmp_path, STAND_IN_SECONDS="0")
    result = subprocess.run(
        ["bash", str(SINGLE_NODE_SCRIPT), "--nproc", "2", "--config", "x.yaml", "--dry-run", "--world-size=3",
         "optim.lr=0.2"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=100,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        expected = "['--config', 'x.yaml', '--dry-run', '--world-size=3', 'optim.lr=0.2']"
        assert f"stand-in rank {rank} args {expected}" in result.stdout


@pytest.mark.timeout(120)
def test_node_script_reports_failure(tmp_path):
    env = _stand_in_env(tmp_path, STAND_IN_SECONDS="0", STAND_IN_EXIT_CODE="3")
    result = _run_single_node(env, tmp_path)
    assert result.returncode not in (0, 2, PREEMPTED_EXIT_CODE), result.stderr[-3000:]


@pytest.mark.timeout(120)
def test_node_script_reports_invalid_configuration(tmp_path):
    # The trainer exits 2 when it rejects its configuration, but torchrun itself exits 1.
    # Whether torchrun stops one rank before it exits 2 by itself depends on timing.
    env = _stand_in_env(tmp_path, STAND_IN_SECONDS="0", STAND_IN_EXIT_CODE="2")
    result = _run_single_node(env, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: the trainer rejected its configuration or command line: " in result.stderr
    both_exited = "2 of 2 training processes exited with code 2." in result.stderr
    one_stopped = "1 of 2 training processes exited with code 2 and torchrun stopped the other 1." in result.stderr
    assert both_exited or one_stopped, result.stderr[-3000:]


@pytest.mark.timeout(120)
def test_node_script_reports_invalid_configuration_of_one_rank(tmp_path):
    # Rank 0 exits 2 at once, and torchrun stops rank 1 (SIGTERM, exit code 143).
    env = _stand_in_env(tmp_path, STAND_IN_SECONDS_RANK_0="0", STAND_IN_SECONDS_RANK_1="60",
                        STAND_IN_EXIT_CODE="2")
    result = _run_single_node(env, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "1 of 2 training processes exited with code 2 and torchrun stopped the other 1." in result.stderr


@pytest.mark.timeout(120)
def test_node_script_reports_other_failure_with_stopped_rank(tmp_path):
    # Rank 0 fails with 3, not 2, so the node reports torchrun's failure.
    env = _stand_in_env(tmp_path, STAND_IN_SECONDS_RANK_0="0", STAND_IN_SECONDS_RANK_1="60",
                        STAND_IN_EXIT_CODE="3")
    result = _run_single_node(env, tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "rejected its configuration" not in result.stderr


@pytest.mark.timeout(120)
def test_node_script_forwards_usr1(tmp_path):
    env = _stand_in_env(tmp_path, STAND_IN_SECONDS="60")
    markers = tmp_path / "markers"
    launcher = subprocess.Popen(
        ["bash", str(SINGLE_NODE_SCRIPT), "--nproc", "2", "--config", "x.yaml"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_for_files([markers / "started-0", markers / "started-1"], timeout_seconds=60)
        # The wrappers write their process ids after the trainers start; give them a moment.
        time.sleep(1.0)
        launcher.send_signal(signal.SIGUSR1)
        output, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    assert (markers / "checkpoint-0").exists()
    assert (markers / "checkpoint-1").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arguments, message", [
    (["--max-restarts", "abc"], "--max-restarts must be a non-negative integer, got 'abc'"),
    (["--max-restarts=-1"], "--max-restarts must be a non-negative integer, got '-1'"),
    (["--max-restart", "2"], "unknown option '--max-restart'. Valid options are this script's "
                             "(--nproc, --max-restarts) and the trainer's (--config, --resume, --dry-run, "
                             "--world-size), plus section.key=value config overrides"),
    (["--confg=y.yaml"], "unknown option '--confg'"),
])
def test_node_script_rejects_bad_options(tmp_path, arguments, message):
    env = _stand_in_env(tmp_path, STAND_IN_SECONDS="0")
    result = subprocess.run(
        ["bash", str(SINGLE_NODE_SCRIPT), "--nproc", "1", "--config", "x.yaml", *arguments],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=50,
    )
    assert result.returncode == 2
    assert f"error: {message}" in result.stderr
    assert "torchrun" not in result.stderr, "rejected after torchrun started"
    assert not list((tmp_path / "markers").iterdir()), "a trainer started"


@pytest.mark.timeout(60)
def test_node_script_rejects_bad_nproc(tmp_path):
    result = subprocess.run(
        ["bash", str(SINGLE_NODE_SCRIPT), "--nproc", "zero", "--config", "x.yaml"],
        env=_launch_env(tmp_path), capture_output=True, text=True, timeout=50,
    )
    assert result.returncode == 2
    assert "--nproc must be a positive integer, got 'zero'" in result.stderr


@pytest.mark.timeout(120)
def test_multi_node_script_passes_arguments(tmp_path):
    env = _stand_in_env(tmp_path, STAND_IN_SECONDS="0")
    endpoint = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        ["bash", str(MULTI_NODE_SCRIPT), "--nnodes=1", "--rdzv-endpoint", endpoint, "--node-rank", "0",
         "--nproc=2", "--config", "x.yaml", "--resume", "optim.lr=0.2"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=100,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"stand-in rank {rank} args ['--config', 'x.yaml', '--resume', 'optim.lr=0.2']" in result.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arguments, message", [
    (["--nnodes", "2", "--nproc", "1", "--config", "x.yaml"], "--nnodes and --rdzv-endpoint are required"),
    (["--nnodes", "2", "--rdzv-endpoint", "node001", "--config", "x.yaml"],
     "--rdzv-endpoint must be HOST:PORT, got 'node001'"),
    (["--nnodes", "1:2", "--rdzv-endpoint", "node001:29500", "--node-rank", "0", "--nproc", "1"],
     "--node-rank needs a fixed --nnodes, got '1:2'"),
    (["--config", "x.yaml", "--nnodes", "2", "--rdzv-endpoint"], "--rdzv-endpoint needs a value"),
    (["--nnodes", "two", "--rdzv-endpoint", "node001:29500", "--nproc", "1"],
     "--nnodes must be a positive integer N or MIN:MAX, got 'two'"),
    (["--nnodes", "0", "--rdzv-endpoint", "node001:29500", "--nproc", "1"],
     "--nnodes must be a positive integer N or MIN:MAX, got '0'"),
    (["--nnodes", "3:2", "--rdzv-endpoint", "node001:29500", "--nproc", "1"],
     "--nnodes MIN:MAX needs MIN <= MAX, got '3:2'"),
    (["--nnodes", "2", "--rdzv-endpoint", "node001:29500", "--node-rank", "2", "--nproc", "1"],
     "--node-rank must be an integer from 0 to 1, got '2'"),
    (["--nnodes", "2", "--rdzv-endpoint", "node001:29500", "--max-restarts", "abc", "--nproc", "1"],
     "--max-restarts must be a non-negative integer, got 'abc'"),
    (["--nnodes", "2", "--rdzv-endpoint", "node001:29500", "--node_rank", "0", "--nproc", "1"],
     "unknown option '--node_rank'. Valid options are this script's (--nnodes, --rdzv-endpoint, "
     "--rdzv-id, --node-rank, --nproc, --max-restarts)"),
])
def test_multi_node_script_rejects_bad_options(tmp_path, arguments, message):
    result = subprocess.run(["bash", str(MULTI_NODE_SCRIPT), *arguments], env=_launch_env(tmp_path),
                            capture_output=True, text=True, timeout=50)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.timeout(30)
def test_node_scripts_print_help(tmp_path):
    for script in (SINGLE_NODE_SCRIPT, MULTI_NODE_SCRIPT):
        result = subprocess.run(["bash", str(script), "--help"], env=_launch_env(tmp_path),
                                capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, script.name
        assert "Usage:" in result.stdout, script.name
        assert "--max-restarts R" in result.stdout, script.name


# A real Slurm cluster.


@pytest.mark.timeout(180)
def test_cluster_runs_trivial_job(slurm_cluster: SlurmCluster, tmp_path):
    output = tmp_path / "trivial.out"
    job_id = slurm_cluster.submit(
        f"--output={output}", "--time=2", "--wrap", "echo trivial job $SLURM_JOB_ID done"
    )
    fields = slurm_cluster.wait_for_job(job_id, ("COMPLETED", "FAILED", "CANCELLED"), 120)
    assert fields["JobState"] == "COMPLETED", output.read_text() if output.exists() else fields
    assert fields["ExitCode"] == "0:0"
    assert output.read_text().strip() == f"trivial job {job_id} done"


def _submit_batch_script(cluster: SlurmCluster, tmp_path: Path, env: dict[str, str],
                         processes: int, overrides: list[str]) -> tuple[int, Path]:
    """Submit lookaround.sbatch as a CPU job and return its id and log file."""
    log_file = tmp_path / "job.out"
    job_id = int(subprocess.run(
        [
            "sbatch", "--parsable",
            "--gpus-per-node=0", f"--cpus-per-task={cluster.cpus}", "--time=30",
            f"--output={log_file}",
            f"--export=ALL,CONFIG={DEMO_CONFIG},CPU_PROCESSES_PER_NODE={processes}",
            str(SBATCH_SCRIPT), *overrides,
        ],
        env={**env, "SLURM_CONF": str(cluster.conf_path)}, cwd=REPO_ROOT,
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip().split(";")[0])
    return job_id, log_file


def _job_log(log_file: Path) -> str:
    return log_file.read_text(errors="replace") if log_file.exists() else "(no log)"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sbatch_requeues_stand_in(slurm_cluster: SlurmCluster, tmp_path):
    env = _stand_in_env(tmp_path, STAND_IN_SECONDS="120")
    markers = tmp_path / "markers"
    job_id, log_file = _submit_batch_script(slurm_cluster, tmp_path, env, 2, ["optim.lr=0.2"])

    _wait_for_files([markers / "started-0", markers / "started-1"], timeout_seconds=120)
    time.sleep(1.0)
    for name in ("started-0", "started-1"):
        (markers / name).unlink()
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
    _wait_for_files([markers / "checkpoint-0", markers / "checkpoint-1"], timeout_seconds=60)

    # The requeued run starts again: the second start shows the resume flag.
    _wait_for_files([markers / "started-0", markers / "started-1"], timeout_seconds=240)
    slurm_cluster.run("scancel", str(job_id))
    time.sleep(2.0)
    log = _job_log(log_file)
    assert "SLURM_RESTART_COUNT=0" in log
    assert "SLURM_RESTART_COUNT=1" in log
    assert "exit code 85); requeueing" in log
    assert re.search(r"args \[.*'optim\.lr=0\.2'.*'--resume'\]", log), log[-3000:]


def _wait_for_checkpoint(run_dir: Path, cluster: SlurmCluster, job_id: int, log_file: Path,
                         timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not list((run_dir / "checkpoints").glob("step-*/meta.pt")):
        state = cluster.job_fields(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job_id} is {state} before its first checkpoint:\n"
                                 f"{_job_log(log_file)[-5000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no checkpoint in {run_dir} after {timeout_seconds:.0f} s:\n"
                               f"{_job_log(log_file)[-5000:]}")
        time.sleep(0.5)


def _run_demo_job(cluster: SlurmCluster, tmp_path: Path, name: str, preempt: bool) -> Path:
    """Run the demo through lookaround.sbatch; return the final consensus weights file."""
    job_dir = tmp_path / name
    job_dir.mkdir()
    output_dir = tmp_path / "runs"
    overrides = [*DEMO_OVERRIDES, f"train.output_dir={output_dir}"]
    env = _launch_env(job_dir, RUN_NAME=name)
    job_id, log_file = _submit_batch_script(cluster, job_dir, env, 3, overrides)

    if preempt:
        # After the first epoch's checkpoint the run is mid-way through epoch 1, so the
        # stop lands on a round boundary inside an epoch.
        _wait_for_checkpoint(output_dir / name, cluster, job_id, log_file, timeout_seconds=400)
        cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))

    fields = cluster.wait_for_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 600)
    log = _job_log(log_file)
    assert fields["JobState"] == "COMPLETED", log[-5000:]
    assert fields["ExitCode"] == "0:0", log[-5000:]
    if preempt:
        assert "SLURM_RESTART_COUNT=1" in log, log[-5000:]
        assert "exit code 85); requeueing" in log, log[-5000:]
        assert fields["Restarts"] == "1"
    else:
        assert "SLURM_RESTART_COUNT=1" not in log
    return output_dir / name / "consensus.pt"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sbatch_trains_demo_on_cpu(slurm_cluster: SlurmCluster, tmp_path):
    consensus_file = _run_demo_job(slurm_cluster, tmp_path, "complete", preempt=False)
    state = torch.load(consensus_file, map_location="cpu", weights_only=True)
    # ResNet-20's classifier: 10 classes from 64 features.
    assert state["fc.weight"].shape == (10, 64)
    assert all(torch.isfinite(tensor).all() for tensor in state.values() if tensor.is_floating_point())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sbatch_preemption_resumes_bitwise(slurm_cluster: SlurmCluster, tmp_path):
    uninterrupted = _run_demo_job(slurm_cluster, tmp_path, "uninterrupted", preempt=False)
    resumed = _run_demo_job(slurm_cluster, tmp_path, "preempted", preempt=True)
    _assert_state_dicts_equal(
        torch.load(uninterrupted, map_location="cpu", weights_only=True),
        torch.load(resumed, map_location="cpu", weights_only=True),
    )
