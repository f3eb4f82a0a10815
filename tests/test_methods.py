"""The baselines: sgd's data, independent branches and their ensemble, Lookahead, SWA."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import run_group
from workers import branch_batch, init_group, small_net, snapshot

pytestmark = pytest.mark.timeout(180)


def eval_batches(rank: int, world_size: int, count: int = 3):
    """Validation data split by rank: batch ``i`` of the full set goes to rank ``i % W``."""
    batches = [branch_batch(branch=99, step=i, batch=6) for i in range(count * world_size)]
    return batches[rank::world_size]


def independent_worker(rank, world_size, port, out_dir):
    """Two independent branches on two ranks, two rounds of k = 2, then the ensemble."""
    from lookaround_dist import Topology
    from lookaround_dist.diversity import evaluate_branches, gather_branch_modules
    from lookaround_dist.methods import IndependentBranches, build_branches
    from workers import train_round

    init_group(rank, world_size, port)
    topology = Topology.create(2)
    branches = build_branches("independent", small_net, topology, k=2)
    for branch in branches.branches:
        branch.optimizer = torch.optim.SGD(branch.module.parameters(), lr=0.1)
    before_average = None
    averaged = []
    for _ in range(2):
        train_round(branches, 1)
        averaged.append(branches.step())
        train_round(branches, 1)
        before_average = snapshot(branches.consensus)
        averaged.append(branches.step())
    modules = gather_branch_modules(branches)
    result = evaluate_branches(modules, eval_batches(rank, world_size), torch.device("cpu"))
    torch.save({"kind": type(branches) is IndependentBranches, "averaged": averaged,
                "rounds": branches.rounds_completed, "before_average": before_average,
                "final": snapshot(branches.consensus), "gathered": [snapshot(m) for m in modules],
                "evaluation": result}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def recalibration_worker(rank, world_size, port, out_dir):
    """Each rank recalibrates the same averaged model on data of its own mean and scale."""
    from lookaround_dist.batchnorm import batchnorm_statistics
    from lookaround_dist.methods import StochasticWeightAverage

    init_group(rank, world_size, port)
    torch.manual_seed(0)
    first, second = small_net(), small_net()
    swa = StochasticWeightAverage(first)
    swa.update(first)
    swa.update(second)
    averaged_before = batchnorm_statistics(swa.module)
    generator = torch.Generator().manual_seed(rank)
    batches = [(3.0 + rank + (1 + rank) * torch.randn(5, 3, 8, 8, generator=generator), torch.zeros(5))
               for _ in range(4)]
    used = swa.recalibrate(iter(batches), num_batches=3)
    torch.save({"first": snapshot(first), "second": snapshot(second), "swa": snapshot(swa.module),
                "updates": swa.updates, "used": used, "before": averaged_before,
                "batches": batches[:3]}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_sgd_gets_all_augmentations(demo_data):
    from lookaround_dist.data import open_index
    from lookaround_dist.data.torchvision_backend import TorchvisionTrainData
    from lookaround_dist.methods import batches_for_branches, data_placement
    from lookaround_dist.topology import Layout, Topology

    index = open_index(str(demo_data / "train-000000.tar.gz"), 10)
    augmentations = ["hflip", "vflip", "randaugment"]
    labels_by_rank = []
    for rank in range(2):
        # One branch over two ranks, as Topology.create(1) builds under a world of two.
        topology = Topology(Layout(world_size=2, num_branches=1, rank=rank), None, None, None)
        placement = data_placement("sgd", topology, num_branches=3, seed=5)
        assert placement.branch_indices == (0, 1, 2)
        assert (placement.position, placement.ranks_per_branch) == (rank, 2)
        data = TorchvisionTrainData(index, placement, augmentations, image_size=32, batch_size=4,
                                    num_workers=0, mean=[0.5] * 3, std=[0.25] * 3, max_steps_per_epoch=1)
        (batches,) = list(data)
        assert len(batches) == 3
        for images, labels in batches[1:]:
            assert torch.equal(labels, batches[0][1]), "every augmentation sees the same base samples"
            assert not torch.equal(images, batches[0][0]), "each augmentation changes the images"
        (joined,) = batches_for_branches("sgd", batches)
        assert joined[0].shape == (12, 3, 32, 32)
        assert torch.equal(joined[1], torch.cat([labels for _, labels in batches]))
        labels_by_rank.append(batches[0][1])
    order = data.sampler.order(0)
    assert torch.equal(torch.tensor([index.samples[i].label for i in order[:8].tolist()]),
                       torch.stack(labels_by_rank, dim=1).reshape(-1)), "ranks split the base batch"


def test_method_names_and_topologies():
    from lookaround_dist.methods import build_branches, check_method, model_branch_count
    from lookaround_dist.topology import Topology

    assert model_branch_count("sgd", 3) == 1
    assert model_branch_count("lookahead", 3) == 1
    assert model_branch_count("independent", 3) == 3
    with pytest.raises(ValueError, match="valid methods: lookaround, sgd, independent, lookahead"):
        check_method("swa")
    with pytest.raises(ValueError, match="expects a topology of 1 branch"):
        build_branches("sgd", small_net, Topology.create(2))


def test_independent_branches_and_ensemble(tmp_path):
    results = run_group(independent_worker, 2, tmp_path)
    for result in results:
        assert result["kind"]
        assert result["averaged"] == [False, True, False, True]
        assert result["rounds"] == 2
        for name, tensor in result["final"].items():
            assert torch.equal(tensor, result["before_average"][name]), f"average step changed {name}"
    names = [n for n in results[0]["final"] if "running" not in n and "num_batches" not in n]
    assert any(not torch.equal(results[0]["final"][n], results[1]["final"][n]) for n in names)

    # Every rank gathers both branches exactly.
    for result in results:
        for branch in range(2):
            for name in names:
                assert torch.equal(result["gathered"][branch][name], results[branch]["final"][name])

    # The ensemble is the mean of the two branches' logits, over the whole validation set.
    models = []
    for branch in range(2):
        model = small_net()
        model.load_state_dict(results[0]["gathered"][branch])
        models.append(model.eval())
    data = eval_batches(0, 1, count=6)
    images = torch.cat([x for x, _ in data])
    labels = torch.cat([y for _, y in data])
    with torch.no_grad():
        logits = [model(images) for model in models]
    ensemble = torch.stack(logits).mean(dim=0)
    evaluation = results[0]["evaluation"]
    assert evaluation == results[1]["evaluation"]
    expected_top1 = 100.0 * (ensemble.argmax(dim=1) == labels).double().mean().item()
    assert evaluation["ensemble_test_top1"] == pytest.approx(expected_top1)
    expected_loss = nn.functional.cross_entropy(ensemble, labels).item()
    assert evaluation["ensemble_test_loss"] == pytest.approx(expected_loss, rel=1e-5)
    for branch in range(2):
        top1 = 100.0 * (logits[branch].argmax(dim=1) == labels).double().mean().item()
        assert evaluation["branch_test_top1"][branch] == pytest.approx(top1)


def test_lookahead_matches_direct_computation():
    from lookaround_dist.methods import Lookahead, build_branches
    from lookaround_dist.topology import Topology

    k, alpha, steps, lr = 3, 0.5, 7, 0.1
    torch.manual_seed(0)
    branches = build_branches("lookahead", small_net, Topology.create(1), k=k)
    module = branches.consensus
    reference = small_net()
    reference.load_state_dict(module.state_dict())
    slow = [p.detach().clone() for p in reference.parameters()]

    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    lookahead = Lookahead(module, alpha=alpha)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    synchronized = []
    for step in range(steps):
        images, labels = branch_batch(0, step)
        for model, opt in ((module, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            opt.step()
        if branches.step():
            lookahead.synchronize()
            synchronized.append(step)
        if (step + 1) % k == 0:
            with torch.no_grad():
                for s, fast in zip(slow, reference.parameters()):
                    s += alpha * (fast - s)
                    fast.copy_(s)
    assert synchronized == [2, 5]
    assert lookahead.synchronizations == 2
    for actual, expected in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    for actual, expected in zip(lookahead.slow, slow):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)

    restored = Lookahead(small_net(), alpha=alpha)
    restored.load_state_dict(lookahead.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.slow, lookahead.slow))


def test_swa_recalibrates_batchnorm(tmp_path):
    results = run_group(recalibration_worker, 2, tmp_path)
    first, second, swa = results[0]["first"], results[0]["second"], results[0]["swa"]
    assert results[0]["updates"] == 2
    assert results[0]["used"] == 3
    torch.testing.assert_close(swa["0.weight"], (first["0.weight"] + second["0.weight"]) / 2)

    # The statistics of the first BatchNorm layer are those of the first convolution's
    # outputs on the data: per rank the mean over batches, then the mean over ranks.
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    conv.weight.data.copy_(swa["0.weight"])
    means, variances = [], []
    with torch.no_grad():
        for result in results:
            outputs = [conv(images) for images, _ in result["batches"]]
            means.append(torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs]).mean(dim=0))
            variances.append(torch.stack([o.transpose(0, 1).reshape(8, -1).var(dim=1) for o in outputs]).mean(dim=0))
    for result in results:
        torch.testing.assert_close(result["swa"]["1.running_mean"], sum(means) / 2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result["swa"]["1.running_var"], sum(variances) / 2, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(result["before"]["1.running_mean"], result["swa"]["1.running_mean"])
    assert results[0]["swa"]["1.num_batches_tracked"].item() == 3


def read_records(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lookahead_swa_run_end_to_end(tmp_path, demo_data):
    from launch import quick_overrides, torchrun_train

    run_dir = tmp_path / "lookahead"
    options = {"train.method": "lookahead", "train.swa_epochs": 1, "train.swa_lr": 0.01,
               "train.recalibrate_bn": "true", "train.bn_recalibration_batches": 2,
               "train.max_steps_per_epoch": 4, "lookaround.k": 2, "data.batch_size": 8}
    result = torchrun_train(2, quick_overrides(run_dir, **options))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "method lookahead: one model, 2 augmentations per step" in result.stdout
    records = read_records(run_dir)
    assert not any("round" in r for r in records), "one model: no branch distances"
    epochs = [r for r in records if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [0, 1]
    # Two ranks, 8 base samples each, 2 augmentations per step.
    assert epochs[0]["images_per_second"] * epochs[0]["epoch_seconds"] == pytest.approx(4 * 8 * 2 * 2)
    assert "swa_test_top1" not in epochs[0]
    assert 0.0 <= epochs[1]["swa_test_top1"] <= 100.0
    assert epochs[1]["lr"] == pytest.approx(0.01)
    assert 0.0 <= epochs[1]["recalibrated_test_top1"] <= 100.0
    assert (run_dir / "swa.pt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_independent_run_end_to_end(tmp_path, demo_data):
    from launch import quick_overrides, torchrun_train

    run_dir = tmp_path / "independent"
    options = {"train.method": "independent", "train.max_steps_per_epoch": 4, "lookaround.k": 2,
               "data.batch_size": 8, "train.diversity_interval_rounds": 1}
    result = torchrun_train(2, quick_overrides(run_dir, **options))
    assert result.returncode == 0, result.stdout[-3000:]
    records = read_records(run_dir)
    rounds = [r for r in records if "round" in r]
    epochs = [r for r in records if "round" not in r]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    # Never averaged: the branches drift further apart round after round.
    distances = [r["pairwise_distance_rms"] for r in rounds]
    assert distances[0] > 0
    assert distances[-1] > distances[0]
    for record in epochs:
        assert len(record["branch_test_top1"]) == 2
        assert record["test_top1"] == record["ensemble_test_top1"]
