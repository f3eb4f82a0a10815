"""The average step on real gloo process groups."""

import pytest
import torch

from conftest import run_group
from workers import average_worker, integer_mismatch_worker

pytestmark = pytest.mark.timeout(240)


def branch_of(rank, world_size=4, num_branches=2):
    return rank // (world_size // num_branches)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """One W=4, d=2 round, shared by the tests that read it."""
    return run_group(average_worker, 4, tmp_path_factory.mktemp("w4"), num_branches=2, steps=3)


def test_identical_start_despite_per_rank_seeds(four_ranks):
    results = four_ranks
    reference = results[0]["start"][0]
    for result in results:
        for state in result["start"].values():
            for name, tensor in state.items():
                assert torch.equal(tensor, reference[name]), name


def test_four_ranks_two_branches_average(four_ranks):
    results = four_ranks
    before = [r["before"][branch_of(rank)] for rank, r in enumerate(results)]
    after = [r["after"][branch_of(rank)] for rank, r in enumerate(results)]
    param_names = [n for n in before[0] if "running" not in n and "num_batches" not in n]
    buffer_names = [n for n in before[0] if "running" in n]

    # Before: ranks inside a branch agree on parameters, the two branches differ.
    for name in param_names:
        assert torch.equal(before[0][name], before[1][name]), name
        assert torch.equal(before[2][name], before[3][name]), name
    assert any(not torch.equal(before[0][n], before[2][n]) for n in param_names)
    # Running statistics come from each rank's own samples, so they differ inside a branch.
    assert any(not torch.equal(before[0][n], before[1][n]) for n in buffer_names)

    # After: all four ranks are bitwise equal.
    for rank in range(1, 4):
        for name in after[0]:
            assert torch.equal(after[rank][name], after[0][name]), (rank, name)

    # Parameters equal the mean of the two branches (exact for two branches).
    for name in param_names:
        expected = (before[0][name] + before[2][name]) / 2
        assert torch.equal(after[0][name], expected), name
    # Running statistics equal the mean over all ranks.
    for name in buffer_names:
        expected = sum(b[name] for b in before) / 4
        torch.testing.assert_close(after[0][name], expected, rtol=1e-6, atol=1e-7)
    # num_batches_tracked is checked, not averaged: it stays the common count.
    assert after[0]["1.num_batches_tracked"].item() == 3


def test_average_uses_one_collective_per_bucket(tmp_path, four_ranks):
    results = run_group(average_worker, 2, tmp_path, num_branches=2, steps=1)
    # One rank per branch: parameters and buffers share one float32 bucket, plus the
    # integer-buffer check, which can be skipped.
    assert results[0]["collectives"] == 2
    assert results[0]["collectives_unchecked"] == 1
    # Two ranks per branch: parameters over the peer group, buffers over the world.
    assert four_ranks[0]["collectives"] == 3
    assert four_ranks[0]["collectives_unchecked"] == 2


def test_sequential_matches_parallel_layout(tmp_path):
    sequential = run_group(average_worker, 1, tmp_path / "w1", num_branches=3, steps=4)
    parallel = run_group(average_worker, 3, tmp_path / "w3", num_branches=3, steps=4)
    hosted = sequential[0]["after"]
    assert sequential[0]["branches"] == [0, 1, 2]
    # Every hosted branch holds the consensus after the average step.
    for name in hosted[0]:
        assert torch.equal(hosted[1][name], hosted[0][name])
        assert torch.equal(hosted[2][name], hosted[0][name])
    # Sums of three branches may round in another order: float32 tolerance.
    for name, tensor in parallel[0]["after"][0].items():
        torch.testing.assert_close(hosted[0][name], tensor, rtol=1e-5, atol=1e-6)
    # Before averaging, the branches trained identically in both layouts.
    for branch in range(3):
        for name, tensor in parallel[branch]["before"][branch].items():
            torch.testing.assert_close(sequential[0]["before"][branch][name], tensor, rtol=1e-5, atol=1e-6)


def test_channels_last_kept_after_average(tmp_path):
    results = run_group(average_worker, 2, tmp_path, num_branches=2, steps=2, memory_format="channels_last")
    weight = results[0]["after"][0]["0.weight"]
    reference = torch.empty(8, 3, 3, 3).to(memory_format=torch.channels_last).stride()
    assert results[0]["strides"][0] == reference
    assert torch.equal(results[1]["after"][1]["0.weight"], weight)


def test_optimizer_state_averaged_when_asked(tmp_path):
    kept = run_group(average_worker, 2, tmp_path / "kept", num_branches=2, steps=2)
    averaged = run_group(average_worker, 2, tmp_path / "avg", num_branches=2, steps=2,
                         average_optimizer_state=True)
    differs = any(not torch.equal(a, b) for a, b in zip(kept[0]["momentum"][0], kept[1]["momentum"][1]))
    assert differs, "momentum must stay per branch by default"
    for a, b in zip(averaged[0]["momentum"][0], averaged[1]["momentum"][1]):
        assert torch.equal(a, b)


def test_integer_buffer_disagreement_rejected(tmp_path):
    results = run_group(integer_mismatch_worker, 2, tmp_path)
    for result in results:
        assert "num_batches_tracked" in result["message"]
