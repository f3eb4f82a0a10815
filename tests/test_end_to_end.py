"""Whole runs through torchrun on the shipped CIFAR-10 subset."""

import json

import pytest
import torch

from launch import quick_overrides, torchrun_module, torchrun_train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def read_metrics(run_dir):
    """The per-epoch records of a run (per-round records carry a "round" key)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "round" not in r]


def test_run_lowers_loss_saves_and_resumes(tmp_path, demo_data):
    run_dir = tmp_path / "run"
    first = torchrun_train(2, quick_overrides(run_dir, **{"train.epochs": 3}))
    assert first.returncode == 0, first.stdout[-3000:]
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert sum(metrics[-1]["train_loss"]) < sum(metrics[0]["train_loss"])
    for record in metrics:
        assert len(record["train_loss"]) == 2
        assert 0.0 <= record["test_top1"] <= 100.0
        assert record["images_per_second"] > 0
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "consensus.pt").is_file()
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-000000016", "step-000000024"]  # the last two kept
    assert "branch 0: augmentation hflip, ranks [0]" in first.stdout

    # The final weights load into a plain model.
    from lookaround_dist.models import build_model

    model = build_model("resnet20", 10)
    model.load_state_dict(torch.load(run_dir / "consensus.pt", weights_only=True))

    # lookaround-eval on two processes reproduces the run's own last evaluation.
    evaluated = torchrun_module(2, "lookaround_dist.cli.evaluate", [str(run_dir)])
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["samples"] == 1000
    assert result["test_top1"] == pytest.approx(metrics[-1]["test_top1"], abs=1e-9)
    assert result["test_loss"] == pytest.approx(metrics[-1]["test_loss"], rel=1e-5)

    resumed = torchrun_train(2, quick_overrides(run_dir, **{"train.epochs": 4}), extra_args=["--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    assert [m["epoch"] for m in read_metrics(run_dir)] == [0, 1, 2, 3]


def test_existing_run_directory_not_overwritten(tmp_path, demo_data):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("user: data\n")
    result = torchrun_train(2, quick_overrides(run_dir))
    assert result.returncode != 0
    assert "already holds a run" in result.stdout
    assert (run_dir / "config.yaml").read_text() == "user: data\n"
