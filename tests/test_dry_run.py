"""``lookaround-train --dry-run``: the summary of a valid run, and the reason and exit code of
invalid ones. No process group is created and nothing is trained."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from lookaround_dist.cli.train import main

REPO = Path(__file__).resolve().parents[1]
TWO_BRANCHES = ["lookaround.num_branches=2", "data.augmentations=[hflip,vflip]", "data.backend=torchvision"]


def write_shard(path: Path, labels: list[int]) -> None:
    """Write a webdataset shard of 8 x 8 px JPEG images with the given class labels."""
    with tarfile.open(path, "w") as archive:
        for number, label in enumerate(labels):
            image = io.BytesIO()
            Image.new("RGB", (8, 8), (number * 20 % 256, 64, 128)).save(image, format="JPEG")
            for suffix, payload in ((".jpg", image.getvalue()), (".cls", str(label).encode())):
                member = tarfile.TarInfo(f"{path.stem}-{number:04d}{suffix}")
                member.size = len(payload)
                archive.addfile(member, io.BytesIO(payload))


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A folder that contains only two shards of 16 samples each, with labels 0..3."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(2):
        write_shard(folder / f"train-{shard:06d}.tar", [n % 4 for n in range(16)])
    return folder


@pytest.fixture
def dry_run_output(capsys):
    """Run ``lookaround-train --dry-run`` in this process; return (exit code, output)."""
    saved_handlers, saved_level = logging.root.handlers[:], logging.root.level

    def run(*arguments: str) -> tuple[int, str]:
        code = main(["--dry-run", *arguments])
        return code, capsys.readouterr().out

    yield run
    logging.root.handlers[:] = saved_handlers  # main() points logging at this test's stdout
    logging.root.setLevel(saved_level)


def tiny_arguments(data: Path, world_size: int, *overrides: str) -> list[str]:
    """Return the arguments of a dry run on ``data``; ``overrides`` replace the defaults of
    the same keys, because lookaround-train rejects a key given twice."""
    defaults = [*TWO_BRANCHES, f"data.train_path={data}", "data.val_path=''", "model.num_classes=4",
                "data.batch_size=4", "data.num_workers=0"]
    replaced = {override.split("=", 1)[0] for override in overrides}
    remaining_defaults = [default for default in defaults if default.split("=", 1)[0] not in replaced]
    return ["--world-size", str(world_size), *remaining_defaults, *overrides]


@pytest.mark.timeout(120)
def test_demo_config_prints_summary(tmp_path, demo_data):
    output_dir = tmp_path / "runs"
    command = [sys.executable, "-m", "lookaround_dist.cli.train", "--dry-run", "--world-size", "4",
               "--config", "configs/demo.yaml", *TWO_BRANCHES, f"train.output_dir={output_dir}"]
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=110)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "the configuration is valid for world size W=4" in result.stdout
    assert "2 rank(s) per branch, 1 branch(es) per rank" in result.stdout
    assert "branch 0: augmentation hflip, ranks [0, 1]" in result.stdout
    assert "branch 1: augmentation vflip, ranks [2, 3]" in result.stdout
    assert "peer groups (average step): [[0, 2], [1, 3]]" in result.stdout
    assert "5000 training samples, labels 0..9 (10 of 10 classes present); 1000 validation samples" in result.stdout
    assert "training shards: 4 file(s), 2.0 per rank of a branch" in result.stdout
    assert "base batch 128, 39 steps per epoch" in result.stdout
    assert "train loss" not in result.stdout
    assert not output_dir.exists()


@pytest.mark.timeout(60)
def test_tiny_data_valid_for_two_ranks(tiny_data, dry_run_output):
    code, output = dry_run_output(*tiny_arguments(tiny_data, 2))
    assert code == 0, output
    assert "32 training samples, labels 0..3 (4 of 4 classes present)" in output
    assert "training shards: 2 file(s), 2.0 per rank of a branch (1 rank(s) per branch)" in output
    assert "base batch 4, 8 steps per epoch" in output
    assert "WARNING" not in output


@pytest.mark.timeout(60)
def test_few_shards_warn_per_reader(tiny_data, dry_run_output):
    code, output = dry_run_output(*tiny_arguments(tiny_data, 4, "data.num_workers=2"))
    assert code == 0, output
    assert "2 training shard(s) for 4 reader(s) (2 rank(s) per branch x 2 loader worker(s) each)" in output
    assert "training shards: 2 file(s), 1.0 per rank of a branch (2 rank(s) per branch)" in output


@pytest.mark.timeout(60)
def test_missing_classes_warn(tmp_path, dry_run_output):
    write_shard(tmp_path / "train-000000.tar", [0, 1] * 8)
    code, output = dry_run_output(*tiny_arguments(tmp_path / "train-000000.tar", 2))
    assert code == 0, output
    assert "labels of 2 of model.num_classes=4 classes" in output


INVALID_CASES = {
    "world size": (["--world-size", "3"], "TopologyError: world size W=3 does not fit d=2 branches"),
    "unknown model": (["model.name=resnet21"], "unknown model 'resnet21'; valid names: resnet110"),
    "missing data": (["data.train_path=DATA/missing-{000000..000001}.tar"], "shard not found: "),
    "label range": (["model.num_classes=3"], "label 3 of key train-000000-0003 in "),
    "batch too large": (["data.batch_size=64"], "32 training samples cannot fill one base batch of 64"),
    "image size": (["model.name=vit_b_32", "data.image_size=40"], "Input shape indivisible by patch size"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(INVALID_CASES))
def test_invalid_run_fails_with_reason(case, tiny_data, dry_run_output):
    overrides, reason = INVALID_CASES[case]
    overrides = [item.replace("DATA", str(tiny_data)) for item in overrides]
    world_size = 2
    if overrides[0] == "--world-size":
        world_size, overrides = int(overrides[1]), overrides[2:]
    code, output = dry_run_output(*tiny_arguments(tiny_data, world_size, *overrides))
    assert code == 2, output
    assert "dry run failed: " in output
    assert reason in output
    assert "the configuration is valid" not in output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["sgd", "lookahead"])
def test_single_model_summary(method, tiny_data, dry_run_output):
    code, output = dry_run_output(*tiny_arguments(tiny_data, 2, f"train.method={method}"))
    assert code == 0, output
    assert (f"method {method}: one model trained on all d=2 augmentations (hflip, vflip) of each "
            f"base batch, DDP over ranks [0, 1]") in output
    assert "every k=5 steps: " in output
    assert "BatchNorm statistics averaged over all 2 rank(s)" in output
    # Each rank reads 4 samples of the base batch of 8 and trains on both augmentations of them.
    assert ("batch 4 per rank and augmentation, 8 images per rank and step (2 augmentations), "
            "base batch 8, 4 steps per epoch") in output
    assert "training shards: 2 file(s), 1.0 per rank (2 rank(s) read disjoint shares of each base batch)" in output
    assert "per rank and branch" not in output
    assert "augmentation hflip, ranks" not in output
    assert "peer groups" not in output
    assert ("the slow weights move alpha=0.5 of the way to the fast weights" in output) == (method == "lookahead")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["lookaround", "independent"])
def test_branch_method_summary(method, tiny_data, dry_run_output):
    code, output = dry_run_output(*tiny_arguments(tiny_data, 2, f"train.method={method}"))
    assert code == 0, output
    assert f"method {method}: branches d=2, k=5: 1 rank(s) per branch, 1 branch(es) per rank" in output
    assert "branch 0: augmentation hflip, ranks [0]" in output
    assert "branch 1: augmentation vflip, ranks [1]" in output
    assert "batch 4 per rank and branch, base batch 4, 8 steps per epoch" in output
    assert ("peer groups (average step): [[0, 1]]" in output) == (method == "lookaround")
    assert ("branches never averaged" in output) == (method == "independent")
