"""Bad input through lookaround-train: each case exits non-zero quickly, saying what was
expected and what was found. Data cases use real shards with corrupted members."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
from pathlib import Path

import pytest

from launch import quick_overrides, torchrun_train

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]


def demo_samples(count: int) -> list[tuple[str, bytes, bytes]]:
    """The first ``count`` (key, jpg, cls) samples of the demo's first training shard."""
    data = gzip.decompress((REPO / "demo" / "cifar10" / "train-000000.tar.gz").read_bytes())
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive:
            key, _, extension = member.name.partition(".")
            members.setdefault(key, {})[extension] = archive.extractfile(member).read()
            if len(members) > count:
                break
    return [(key, parts["jpg"], parts["cls"]) for key, parts in list(members.items())[:count]]


def write_shard(path: Path, samples) -> Path:
    with tarfile.open(path, "w") as archive:
        for key, image, label in samples:
            for extension, payload in (("jpg", image), ("cls", label)):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return path


def train(tmp_path, monkeypatch, capsys, world_size: int = 1, **options) -> tuple[int, str, float]:
    """Run lookaround-train in this process as rank 0 of ``world_size``; return its exit code,
    output and duration. Only checks made before the process group exists can pass W > 1."""
    from lookaround_dist.cli.train import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    if world_size > 1:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.chdir(REPO)
    values = {"data.num_workers": 0, "train.epochs": 1, "train.max_steps_per_epoch": 2,
              "data.batch_size": 16, "train.threads_per_rank": 1, "data.val_path": "''"}
    values.update(options)
    started = time.monotonic()
    code = main(["--config", "configs/demo.yaml", *quick_overrides(tmp_path / "run", **values)])
    return code, capsys.readouterr().out, time.monotonic() - started


@pytest.fixture
def shards(tmp_path, demo_data) -> dict[str, Path]:
    """A good shard, one with an image that does not decode, one with a label out of range."""
    samples = demo_samples(32)
    broken_image = [(k, b"\xff\xd8\xff not a jpeg" if i == 5 else image, label)
                    for i, (k, image, label) in enumerate(samples)]
    broken_label = [(k, image, b"10" if i == 7 else label) for i, (k, image, label) in enumerate(samples)]
    return {
        "good": write_shard(tmp_path / "good-000000.tar", samples),
        "bad_image": write_shard(tmp_path / "image-000000.tar", broken_image),
        "bad_label": write_shard(tmp_path / "label-000000.tar", broken_label),
        "empty": write_shard(tmp_path / "empty-000000.tar", []),
        "bad_key": broken_image[5][0],
        "bad_label_key": broken_label[7][0],
    }


def test_undecodable_image_names_shard_and_key(tmp_path, monkeypatch, capsys, shards):
    code, output, seconds = train(tmp_path, monkeypatch, capsys, **{"data.train_path": shards["bad_image"]})
    assert code == 1
    assert f"cannot decode image {shards['bad_key']} in {shards['bad_image']}" in output
    assert seconds < 60


def test_undecodable_image_skipped_and_counted(tmp_path, monkeypatch, capsys, shards):
    code, output, _ = train(tmp_path, monkeypatch, capsys, **{
        "data.train_path": shards["bad_image"], "data.on_decode_error": "skip"})
    assert code == 0, output[-3000:]
    assert "epoch 0: 1 training image(s) failed to decode and were skipped" in output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    record = [r for r in records if "round" not in r][0]
    assert record["skipped_images"] == 1


def test_label_out_of_range_rejected(tmp_path, monkeypatch, capsys, shards):
    code, output, seconds = train(tmp_path, monkeypatch, capsys, **{"data.train_path": shards["bad_label"]})
    assert code == 1
    assert (f"label 10 of key {shards['bad_label_key']} in {shards['bad_label']} is out of range: "
            f"model.num_classes=10 allows 0..9") in output
    assert seconds < 30


@pytest.mark.parametrize("case, expected", [
    ("missing", "shard not found: "),
    ("empty", "contains no samples"),
])
def test_missing_or_empty_data_rejected(tmp_path, monkeypatch, capsys, shards, case, expected):
    path = tmp_path / "absent-000000.tar" if case == "missing" else shards["empty"]
    code, output, _ = train(tmp_path, monkeypatch, capsys, **{"data.train_path": path})
    assert code == 1
    assert expected in output


@pytest.mark.parametrize("override, expected", [
    ({"lookaround.k": 0}, "lookaround.k must be >= 1, found 0"),
    ({"data.batch_size": 0}, "data.batch_size must be >= 1, found 0"),
    ({"lookaround.num_branches": 3}, "data.augmentations needs one name per branch"),
    ({"train.nonfinite_policy": "ignore"}, "train.nonfinite_policy must be one of stop, skip, rollback"),
])
def test_invalid_config_rejected(tmp_path, monkeypatch, capsys, demo_data, override, expected):
    code, output, _ = train(tmp_path, monkeypatch, capsys, **override)
    assert code == 2
    assert expected in output


@pytest.mark.parametrize("override, expected", [
    ({"model.name": "resnet21"}, "resnet20"),
    ({"data.augmentations": "[hflip,sideways]"}, "randaugment"),
    ({"data.batch_size": 40}, "32 training samples cannot fill one base batch of 40"),
])
def test_unknown_names_and_batch_rejected(tmp_path, monkeypatch, capsys, shards, override, expected):
    options = {"data.train_path": shards["good"], **override}
    code, output, _ = train(tmp_path, monkeypatch, capsys, **options)
    assert code == 1
    assert expected in output  # the message lists the valid names or the sizes


def test_dali_too_few_shards_rejected(tmp_path, monkeypatch, capsys, shards):
    pytest.importorskip("nvidia.dali")
    # Two ranks per branch read one shard: rejected in preflight, before any process group.
    code, output, seconds = train(tmp_path, monkeypatch, capsys, world_size=2, **{
        "data.train_path": shards["good"], "data.backend": "dali", "lookaround.num_branches": 1,
        "data.augmentations": "[hflip]"})
    assert code == 1
    assert "expected >= 2 shards, found 1" in output
    assert seconds < 30


@pytest.mark.slow
def test_world_size_not_fitting_branches(tmp_path, demo_data):
    """W=2 with d=3 under torchrun: both ranks exit at once, naming the world sizes that fit."""
    started = time.monotonic()
    result = torchrun_train(2, quick_overrides(tmp_path / "run", **{
        "lookaround.num_branches": 3, "data.augmentations": "[hflip,vflip,rotate]"}), timeout=100)
    assert result.returncode != 0
    assert "world size" in result.stdout.lower()
    assert "3" in result.stdout
    assert time.monotonic() - started < 60
