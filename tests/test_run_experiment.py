"""The experiment script's option checks and commands, without training (--dry-run)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_experiment.py"


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", *arguments], cwd=REPO,
                          capture_output=True, text=True, timeout=100)


def fake_shards(folder: Path, train: int, test: int) -> Path:
    folder.mkdir()
    for i in range(train):
        (folder / f"train-{i:06d}.tar.gz").write_bytes(b"")
    for i in range(test):
        (folder / f"test-{i:06d}.tar.gz").write_bytes(b"")
    return folder


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arguments, message", [
    (["--epochs", "0"], "--epochs must be >= 1, found 0"),
    (["--threads", "0"], "--threads must be >= 1, found 0"),
    (["--processes", "2"], "--processes must divide or be a multiple of the 3 branches"),
    (["--train-shards", "3"], "train-000002.tar.gz not found"),
    (["--test-shards", "3"], "--test-shards must lie in [1, 2], found 3"),
    (["optim.lr=abc"], "optim.lr expects a number, found 'abc'"),
])
def test_invalid_options_rejected(tmp_path, arguments, message):
    data = fake_shards(tmp_path / "shards", train=2, test=2)
    result = run_script("--data", str(data), "--output", str(tmp_path / "out"), *arguments)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "torch.distributed.run" not in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(120)
def test_dry_run_commands_survive_the_shell(tmp_path):
    data = fake_shards(tmp_path / "shards", train=2, test=2)
    result = run_script("--data", str(data), "--output", str(tmp_path / "out"), "--variants", "sgd",
                        "--seeds", "3", "--train-shards", "2", "train.evaluate_branches=false")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if "torch.distributed.run" in line]
    assert len(commands) == 1
    # Read back as a shell would: the brace pattern must stay one argument.
    words = shlex.split(commands[0])
    assert f"data.train_path={data}/train-{{000000..000001}}.tar.gz" in words
    assert "train.method=sgd" in words
    assert "train.seed=3" in words
    # The user's override replaces the script's own value of the same key.
    assert "train.evaluate_branches=false" in words
    assert "train.evaluate_branches=true" not in words
