"""Branch distances to the consensus, and gathering every branch onto every rank."""

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import run_group
from workers import init_group, small_net, snapshot, train_round

pytestmark = pytest.mark.timeout(180)


def diversity_worker(rank, world_size, port, out_dir, num_branches):
    """One round without averaging: measure, gather, average, measure again."""
    from lookaround_dist import Lookaround, Topology
    from lookaround_dist.diversity import gather_branch_modules, measure_diversity

    init_group(rank, world_size, port)
    topology = Topology.create(num_branches)
    lookaround = Lookaround(small_net, topology, k=10)
    for branch in lookaround.branches:
        branch.optimizer = torch.optim.SGD(branch.module.parameters(), lr=0.1, momentum=0.9)
    train_round(lookaround, 3)
    before = {b.index: snapshot(b.module) for b in lookaround.branches}
    diversity = measure_diversity(lookaround)
    gathered = [snapshot(m) for m in gather_branch_modules(lookaround)]
    lookaround.average()
    after = measure_diversity(lookaround)
    torch.save({"before": before, "diversity": diversity.to_record(), "after": after.to_record(),
                "gathered": gathered}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def parameter_vector(state: dict) -> torch.Tensor:
    names = [n for n in state if "running" not in n and "num_batches" not in n]
    return torch.cat([state[n].reshape(-1) for n in names]).double()


def test_summary_matches_pairwise_distances():
    from lookaround_dist.diversity import summarize_distances

    points = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean = points.mean(dim=0)
    summary = summarize_distances([float((p - mean).square().sum()) for p in points],
                                  float(mean.square().sum()))
    pairs = [float((points[i] - points[j]).square().sum())
             for i, j in itertools.permutations(range(4), 2)]
    assert summary.pairwise_distance_rms == pytest.approx(math.sqrt(sum(pairs) / len(pairs)))
    assert summary.branch_distance[2] == pytest.approx(float((points[2] - mean).norm()))
    assert summary.branch_distance_relative[2] == pytest.approx(float((points[2] - mean).norm() / mean.norm()))
    assert summary.consensus_norm == pytest.approx(float(mean.norm()))
    assert summarize_distances([0.0], 1.0).pairwise_distance_rms == 0.0


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """One W=4, d=2 round (two ranks per branch), shared by the tests that read it."""
    return run_group(diversity_worker, 4, tmp_path_factory.mktemp("w4"), num_branches=2)


def test_distances_on_two_ranks_per_branch(four_ranks):
    results = four_ranks
    branch_states = [results[0]["before"][0], results[2]["before"][1]]
    vectors = [parameter_vector(s) for s in branch_states]
    mean = sum(vectors) / 2
    expected = [float((v - mean).norm()) for v in vectors]

    for result in results:
        measured = result["diversity"]
        assert measured == results[0]["diversity"], "every rank reports the same values"
        assert measured["branch_distance"] == pytest.approx(expected, rel=1e-4)
        assert measured["consensus_norm"] == pytest.approx(float(mean.norm()), rel=1e-5)
        assert measured["branch_distance_relative"][1] == pytest.approx(expected[1] / float(mean.norm()), rel=1e-4)
        # Two branches: the RMS pairwise distance is the distance between them.
        assert measured["pairwise_distance_rms"] == pytest.approx(float((vectors[0] - vectors[1]).norm()), rel=1e-4)
        assert min(measured["branch_distance"]) > 0

        # Right after an average step every branch is the consensus.
        assert result["after"]["branch_distance"] == [0.0, 0.0]
        assert result["after"]["pairwise_distance_rms"] == 0.0


def test_gather_averages_buffers_inside_branch(four_ranks):
    results = four_ranks
    for result in results:
        for branch in range(2):
            ranks = [2 * branch, 2 * branch + 1]
            states = [results[r]["before"][branch] for r in ranks]
            gathered = result["gathered"][branch]
            assert torch.equal(gathered["0.weight"], states[0]["0.weight"])
            assert not torch.equal(states[0]["1.running_mean"], states[1]["1.running_mean"])
            torch.testing.assert_close(gathered["1.running_mean"],
                                       (states[0]["1.running_mean"] + states[1]["1.running_mean"]) / 2)
            assert gathered["1.num_batches_tracked"].item() == 3


def test_report_plots_distance_per_round(tmp_path):
    import json

    from lookaround_dist.cli.report import main

    run = tmp_path / "lookaround-seed0"
    run.mkdir()
    records = [
        {"round": 1, "epoch": 0, "step": 5, "branch_distance": [0.5, 0.7], "pairwise_distance_rms": 1.2},
        {"epoch": 0, "test_top1": 40.0, "test_top5": 80.0, "test_loss": 2.0, "train_loss": [2.0, 2.1],
         "images_per_second": 100.0, "wall_seconds": 10.0, "branch_test_top1": [38.0, 36.0],
         "ensemble_test_top1": 41.0},
        {"round": 2, "epoch": 1, "step": 10, "branch_distance": [0.4, 0.6], "pairwise_distance_rms": 1.0},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    output = tmp_path / "report"
    assert main([str(run), "--output", str(output)]) == 0
    table = (output / "report.md").read_text()
    assert "| lookaround | 1 | 40.00 | 40.00 | 80.00 | 2.00 | 100.00 | 10.00 |" in table
    assert "| lookaround | 1 | 37.00 | 41.00 |" in table
    for name in ("branch_distance.png", "pairwise_distance.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in table
