"""The DALI input backend on its CPU path: parity with torchvision, sample order, epochs, resume.

Synthetic shards hold small JPEGs whose label is the sample number, so a batch's labels
identify its samples. Each test builds a few pipelines; a build costs about a second.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from lookaround_dist.data import augment  # noqa: E402
from lookaround_dist.data.base import Placement  # noqa: E402
from lookaround_dist.data.dali_backend import DaliEvalData, DaliTrainData  # noqa: E402
from lookaround_dist.data.sources import open_index  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def asymmetric_image(number: int, size: int = 32) -> np.ndarray:
    """A smooth image that differs from its mirror images, varied by ``number``."""
    y, x = np.mgrid[0:size, 0:size]
    red = x * 255 // (size - 1)
    green = y * 255 // (size - 1)
    blue = np.full_like(x, (number * 37) % 256)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def write_shard(path: Path, numbers: range, size: int = 32) -> Path:
    """A tar of samples ``sNNNN`` whose label is the sample number NNNN."""
    with tarfile.open(path, "w") as archive:
        for number in numbers:
            for name, data in ((f"s{number:04d}.jpg", jpeg_bytes(asymmetric_image(number, size))),
                               (f"s{number:04d}.cls", str(number).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path: Path) -> str:
    """Thirteen samples in two shards of 7 and 6."""
    first = write_shard(tmp_path / "a.tar", range(0, 7))
    second = write_shard(tmp_path / "b.tar", range(7, 13))
    return f"{first},{second}"


def placement(branches=(0,), position=0, ranks_per_branch=1, seed=0) -> Placement:
    return Placement(branch_indices=tuple(branches), position=position,
                     ranks_per_branch=ranks_per_branch, rank=0, world_size=1, seed=seed)


def train_data(path, where: Placement, augmentations, tmp_path, batch_size=2, **kwargs):
    index = open_index(path, num_classes=100)
    return DaliTrainData(path=path, index=index, placement=where, augmentations=augmentations,
                         image_size=32, batch_size=batch_size, num_threads=1, mean=MEAN, std=STD,
                         cache_dir=tmp_path / "cache", num_classes=100, **kwargs)


def epoch_labels(data: DaliTrainData, epoch: int) -> list[list[list[int]]]:
    """Labels of every step of ``epoch``: steps x hosted branches x samples."""
    data.set_epoch(epoch)
    return [[labels.tolist() for _, labels in step] for step in data]


# ---------------------------------------------------------------------------------------
# Parity with the torchvision backend


def test_eval_normalization_matches_torchvision(tmp_path):
    path = str(write_shard(tmp_path / "a.tar", range(4)))
    index = open_index(path)
    data = DaliEvalData(path=path, index=index, rank=0, world_size=1, image_size=32,
                        batch_size=4, num_threads=1, mean=MEAN, std=STD, cache_dir=tmp_path / "cache")
    images, labels = next(iter(data))
    assert images.shape == (4, 3, 32, 32)
    assert images.dtype == torch.float32

    transform = augment.eval_transform(32, MEAN, STD)
    for image, label in zip(images, labels.tolist()):
        decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(index.read(label)[0])).convert("RGB")))
        expected = transform(decoded.permute(2, 0, 1).contiguous())
        # Both decode with libjpeg-turbo; allow two grey levels for IDCT differences.
        tolerance = 2 / 255 / min(STD)
        assert torch.allclose(image, expected, atol=tolerance), (image - expected).abs().max()


def test_hflip_mirrors_pixels(shards, tmp_path):
    # Same seed, branch and position: the base crop draws the same random numbers in both
    # pipelines, so each hflip output is the 'none' output or its mirror.
    plain = train_data(shards, placement(), ["none"], tmp_path, batch_size=6)
    flipped = train_data(shards, placement(), ["hflip"], tmp_path, batch_size=6)
    (plain_images, plain_labels), = next(iter(plain))
    (flip_images, flip_labels), = next(iter(flipped))
    assert plain_labels.tolist() == flip_labels.tolist()

    mirrored = same = 0
    for a, b in zip(plain_images, flip_images):
        if torch.equal(a, b):
            same += 1
        elif torch.equal(a.flip(-1), b):
            mirrored += 1
    assert same + mirrored == len(plain_images)
    assert mirrored > 0
    assert same > 0


def test_labels_match_keys(shards, tmp_path):
    data = train_data(shards, placement(), ["vflip"], tmp_path)
    for step in data:
        (_, labels), = step
        keys, = data.last_keys
        assert labels.tolist() == [int(key[1:]) for key in keys]


@pytest.mark.skipif(not (SHARED_DATA / "imagenet-samples").is_dir(),
                    reason="shared imagenet-samples shards not found beside the repository")
def test_eval_resize_center_crop_matches_torchvision(tmp_path):
    path = str(SHARED_DATA / "imagenet-samples" / "samples-000000.tar")
    index = open_index(path, num_classes=1000)
    data = DaliEvalData(path=path, index=index, rank=0, world_size=50, image_size=224,
                        batch_size=5, num_threads=1, mean=MEAN, std=STD, cache_dir=tmp_path / "cache")
    images, labels = next(iter(data))
    transform = augment.eval_transform(224, MEAN, STD)
    by_key = {sample.key: number for number, sample in enumerate(index.samples)}
    for image, key in zip(images, data.last_keys):
        blob, _ = index.read(by_key[key])
        decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(blob)).convert("RGB")))
        expected = transform(decoded.permute(2, 0, 1).contiguous())
        assert image.shape == expected.shape == (3, 224, 224)
        # When the resized side minus 224 is odd, the centre lies on a half pixel:
        # torchvision rounds it half to even, DALI half up, so the windows may differ by one
        # pixel. Compare the interiors at the best of the shifts by at most one pixel; the
        # resampling filters then differ by under 1.5 grey levels on average.
        differences = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted = expected[:, 1 + dy:223 + dy, 1 + dx:223 + dx]
                differences.append((image[:, 1:223, 1:223] - shifted).abs().mean().item())
        grey_levels = min(differences) * min(STD) * 255
        assert grey_levels < 1.5, f"{key}: mean difference {grey_levels:.2f} grey levels"


# ---------------------------------------------------------------------------------------
# Sample order across branches, positions and epochs


def test_branches_share_samples_positions_disjoint(shards, tmp_path):
    # Two ranks per branch, two branches: four placements in one process.
    runs = {
        (branch, position): train_data(shards, placement([branch], position, 2), ["hflip", "vflip"], tmp_path)
        for branch in (0, 1) for position in (0, 1)
    }
    for epoch in (0, 1):
        labels = {where: epoch_labels(data, epoch) for where, data in runs.items()}
        steps = {len(value) for value in labels.values()}
        assert steps == {runs[0, 0].steps_per_epoch}
        for step in range(runs[0, 0].steps_per_epoch):
            for position in (0, 1):
                assert labels[0, position][step] == labels[1, position][step]
            assert not set(labels[0, 0][step][0]) & set(labels[0, 1][step][0])


def test_hosted_branches_share_samples(shards, tmp_path):
    data = train_data(shards, placement([0, 1, 2]), ["none", "rotate", "vflip"], tmp_path)
    for step in epoch_labels(data, 0):
        assert step[0] == step[1] == step[2]


@pytest.mark.parametrize("last_batch", ["drop", "pad"])
def test_equal_batch_counts_every_epoch(shards, tmp_path, last_batch):
    # 13 samples, 3 ranks per branch, batch 2: slices of 4, 4 and 5 samples.
    expected = 2 if last_batch == "drop" else 3
    runs = [train_data(shards, placement([0], position, 3), ["none"], tmp_path, last_batch=last_batch)
            for position in range(3)]
    for epoch in range(3):
        for data in runs:
            assert data.steps_per_epoch == expected
            steps = epoch_labels(data, epoch)
            assert len(steps) == expected
            assert all(len(branch) == 2 for step in steps for branch in step)


def test_order_changes_between_epochs(shards, tmp_path):
    data = train_data(shards, placement(), ["none"], tmp_path, batch_size=4)
    orders = [epoch_labels(data, epoch) for epoch in range(3)]
    assert orders[0] != orders[1]
    assert orders[1] != orders[2]
    assert epoch_labels(data, 1) == orders[1]


def test_max_steps_per_epoch(shards, tmp_path):
    data = train_data(shards, placement(), ["none"], tmp_path, max_steps_per_epoch=2)
    assert data.steps_per_epoch == 2
    assert len(epoch_labels(data, 0)) == 2


def test_resume_continues_the_epoch(shards, tmp_path):
    reference = train_data(shards, placement([0, 1]), ["hflip", "rotate"], tmp_path)
    reference.set_epoch(1)
    iterator = iter(reference)
    next(iterator)
    state = reference.state_dict()
    assert "dali_checkpoints" in state
    rest = [[(images.clone(), labels.tolist()) for images, labels in step] for step in iterator]

    for keep_checkpoints in (True, False):
        restored = train_data(shards, placement([0, 1]), ["hflip", "rotate"], tmp_path)
        saved = dict(state) if keep_checkpoints else {"epoch": 1, "step_in_epoch": 1}
        restored.load_state_dict(saved)
        resumed = list(restored)
        assert len(resumed) == len(rest)
        for expected_step, step in zip(rest, resumed):
            for (expected_images, expected_labels), (images, labels) in zip(expected_step, step):
                assert labels.tolist() == expected_labels
                assert torch.equal(images, expected_images)


# ---------------------------------------------------------------------------------------
# Validation, input checks and data forms


def test_eval_sees_every_sample_once(shards, tmp_path):
    index = open_index(shards)
    seen = []
    for rank in range(3):
        data = DaliEvalData(path=shards, index=index, rank=rank, world_size=3, image_size=32,
                            batch_size=2, num_threads=1, mean=MEAN, std=STD, cache_dir=tmp_path / "cache")
        for passes in range(2):
            labels = [label for _, batch in data for label in batch.tolist()]
            if passes == 0:
                seen.extend(labels)
                first = labels
            else:
                assert labels == first
    assert sorted(seen) == list(range(13))


def test_unknown_augmentation_lists_valid(shards, tmp_path):
    with pytest.raises(ValueError, match="valid names: none, hflip"):
        train_data(shards, placement(), ["mixup"], tmp_path)


def test_decode_error_skip_rejected(shards, tmp_path):
    with pytest.raises(ValueError, match="on_decode_error=skip"):
        train_data(shards, placement(), ["none"], tmp_path, skip_decode_errors=True)


def test_label_out_of_range_names_key(tmp_path):
    path = str(write_shard(tmp_path / "a.tar", range(40, 44)))
    index = open_index(path)
    data = DaliTrainData(path=path, index=index, placement=placement(), augmentations=["none"],
                         image_size=32, batch_size=2, num_threads=1, mean=MEAN, std=STD,
                         cache_dir=tmp_path / "cache", num_classes=10)
    with pytest.raises(ValueError, match=r"label 4\d of key s004\d in .*a\.tar is out of range"):
        next(iter(data))


def test_gzip_shards_decompressed_into_cache(tmp_path):
    user_data = tmp_path / "data"
    user_data.mkdir()
    plain = write_shard(tmp_path / "a.tar", range(6))
    compressed = user_data / "a.tar.gz"
    with open(plain, "rb") as source, gzip.open(compressed, "wb") as target:
        shutil.copyfileobj(source, target)

    data = train_data(str(compressed), placement(), ["none"], tmp_path)
    labels = sorted(label for step in epoch_labels(data, 0) for label in step[0])
    assert labels == list(range(6))
    assert sorted(p.name for p in user_data.iterdir()) == ["a.tar.gz"]
    cached = sorted(p.suffix for p in (tmp_path / "cache").iterdir())
    assert cached == [".idx", ".tar"]


def test_image_folder_source(tmp_path):
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for number in range(3):
            Image.fromarray(asymmetric_image(number)).save(tmp_path / "tree" / name / f"{number}.jpg")
    path = str(tmp_path / "tree")
    data = train_data(path, placement(), ["hflip"], tmp_path, batch_size=3)
    data.set_epoch(0)
    pairs = []
    for step in data:
        (_, labels), = step
        pairs += zip(data.last_keys[0], labels.tolist())
    assert sorted(pairs) == [(f"{name}/{n}", label) for label, name in enumerate(["cat", "dog"]) for n in range(3)]


@pytest.mark.skipif(not (SHARED_DATA / "imagenet-samples").is_dir(),
                    reason="shared imagenet-samples shards not found beside the repository")
def test_imagenet_thousand_classes(tmp_path):
    folder = SHARED_DATA / "imagenet-samples"
    wnids = [line.split()[0] for line in (folder / "classes.txt").read_text().splitlines()]
    path = ",".join(str(p) for p in sorted(folder.glob("samples-*.tar")))
    index = open_index(path, num_classes=1000)
    data = DaliTrainData(path=path, index=index, placement=placement(), augmentations=["hflip"],
                         image_size=72, batch_size=50, num_threads=2, mean=MEAN, std=STD,
                         cache_dir=tmp_path / "cache", num_classes=1000, max_steps_per_epoch=4)
    labels = []
    for step in data:
        (images, batch_labels), = step
        assert images.shape == (50, 3, 72, 72)
        for key, label in zip(data.last_keys[0], batch_labels.tolist()):
            assert wnids[label] == key.removeprefix("val_")
        labels += batch_labels.tolist()
    assert len(set(labels)) == 200
    assert max(labels) > 255


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_pipeline_outputs_on_device(shards, tmp_path):
    device = torch.device("cuda", 0)
    data = train_data(shards, placement([0, 1]), ["hflip", "trivialaugment"], tmp_path, device=device)
    for step in data:
        for images, labels in step:
            assert images.device == device
            assert labels.device == device
            assert images.shape == (2, 3, 32, 32)
    evaluation = DaliEvalData(path=shards, index=open_index(shards), rank=0, world_size=1,
                              image_size=32, batch_size=4, num_threads=1, mean=MEAN, std=STD,
                              device=device, cache_dir=tmp_path / "cache")
    labels = [label for images, batch in evaluation for label in batch.tolist()]
    assert sorted(labels) == list(range(13))
