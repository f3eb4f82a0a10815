"""Base batches of the torchvision backend: the same samples for every branch, disjoint
inside a branch, equal counts, a fresh order each epoch."""

import pytest
import torch

from lookaround_dist.data import Placement, open_index
from lookaround_dist.data.sources import DataError
from lookaround_dist.data.torchvision_backend import BaseBatchSampler, TorchvisionTrainData
from lookaround_dist.topology import Layout

pytestmark = pytest.mark.timeout(120)


def placements(world_size, num_branches, seed=0):
    return [Placement.from_topology(Layout(world_size, num_branches, r), seed) for r in range(world_size)]


def sampler_keys(index, placement, epoch, batch_size=16, independent=False):
    sampler = BaseBatchSampler(len(index), batch_size, placement, independent, drop_last=True)
    sampler.epoch = epoch
    return [[[index.samples[s].key for s in samples] for samples in zip(*[k[1] for k in step])]
            for step in sampler]


@pytest.fixture(scope="module")
def index(demo_data_module):
    return open_index(str(demo_data_module / "train-{000000..000003}.tar.gz"), num_classes=10)


@pytest.fixture(scope="module")
def demo_data_module():
    from conftest import DEMO_DATA

    if not DEMO_DATA.is_dir():
        pytest.skip(f"the demo subset is missing at {DEMO_DATA}")
    return DEMO_DATA


def test_branches_share_keys_ranks_split_them(index):
    # W=4, d=2: ranks 0,1 run branch 0 and ranks 2,3 run branch 1.
    ranks = [sampler_keys(index, p, epoch=0) for p in placements(4, 2)]
    assert len({len(r) for r in ranks}) == 1, "every rank gets the same number of steps"
    for step in range(len(ranks[0])):
        keys = [ranks[r][step][0] for r in range(4)]
        assert keys[0] == keys[2], "position 0 of both branches sees the same samples"
        assert keys[1] == keys[3], "position 1 of both branches sees the same samples"
        assert not set(keys[0]) & set(keys[1]), "ranks of one branch see disjoint samples"
        assert len(keys[0]) == 16


def test_epoch_covers_each_sample_at_most_once(index):
    ranks = [sampler_keys(index, p, epoch=0) for p in placements(4, 2)[:2]]
    seen = [key for rank in ranks for step in rank for key in step[0]]
    assert len(seen) == len(set(seen))
    assert len(seen) == (len(index) // 32) * 32


def test_order_changes_between_epochs(index):
    placement = placements(2, 2)[0]
    first = sampler_keys(index, placement, epoch=0)
    second = sampler_keys(index, placement, epoch=1)
    assert first[0][0] != second[0][0]
    assert sampler_keys(index, placement, epoch=0) == first, "the order depends on (seed, epoch) only"


def test_independent_sampling_differs_per_branch(index):
    p0, p1 = placements(2, 2)
    assert sampler_keys(index, p0, 0, independent=True)[0][0] != sampler_keys(index, p1, 0, independent=True)[0][0]


def test_pad_keeps_every_sample_and_equal_counts(index):
    placement = placements(3, 3)[0]
    sampler = BaseBatchSampler(len(index), 300, placement, False, drop_last=False)
    assert sampler.steps == -(-len(index) // 300)
    seen = {s for step in sampler for key in step for s in key[1]}
    assert seen == set(range(len(index)))


def test_batch_larger_than_data_rejected(index):
    with pytest.raises(DataError, match="cannot fill one base batch"):
        BaseBatchSampler(len(index), 4000, placements(2, 1)[0], False, drop_last=True)


def test_hosted_branches_get_same_labels(index):
    # W=1, d=3: one loader serves three branches from one decode of each sample.
    placement = placements(1, 3)[0]
    data = TorchvisionTrainData(index, placement, ["hflip", "vflip", "randaugment"], 32, 8, 0,
                                [0.5] * 3, [0.25] * 3, max_steps_per_epoch=2)
    steps = list(data)
    assert len(steps) == 2
    for batches in steps:
        assert len(batches) == 3
        labels = [labels for _, labels in batches]
        assert torch.equal(labels[0], labels[1])
        assert torch.equal(labels[0], labels[2])
        images = [images for images, _ in batches]
        assert images[0].shape == (8, 3, 32, 32)
        assert not torch.equal(images[0], images[1]), "each branch has its own augmentation"


def test_augmentation_independent_of_workers_and_resume(index):
    placement = placements(1, 2)[0]

    def batches(workers, start=0):
        data = TorchvisionTrainData(index, placement, ["randaugment", "hflip"], 32, 8, workers,
                                    [0.5] * 3, [0.25] * 3, max_steps_per_epoch=3)
        data.set_epoch(1)
        if start:
            data.load_state_dict({"epoch": 1, "step_in_epoch": start})
        return list(data)

    plain = batches(0)
    with_workers = batches(2)
    resumed = batches(0, start=2)
    for a, b in zip(plain, with_workers):
        assert torch.equal(a[0][0], b[0][0])
        assert torch.equal(a[1][0], b[1][0])
    assert len(resumed) == 1
    assert torch.equal(resumed[0][0][0], plain[2][0][0])


def test_image_folder_tree_read_in_class_order(tmp_path):
    from PIL import Image

    for label, name in enumerate(["cat", "airplane"]):  # classes are numbered in sorted order
        folder = tmp_path / name
        folder.mkdir()
        for i in range(3):
            Image.new("RGB", (40, 36), color=(60 * label, 10 * i, 0)).save(folder / f"{i}.jpg")
    index = open_index(str(tmp_path), num_classes=2)
    assert len(index) == 6
    assert {s.key.split("/")[0]: s.label for s in index.samples} == {"airplane": 0, "cat": 1}
    data = TorchvisionTrainData(index, placements(1, 1)[0], ["hflip"], 32, 6, 0, [0.5] * 3, [0.25] * 3)
    (images, labels), = next(iter(data))
    assert images.shape == (6, 3, 32, 32)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
