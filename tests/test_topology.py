"""Rank-to-branch layouts, checked without any process group."""

import pytest

from lookaround_dist.topology import Layout, TopologyError, validate_layout


@pytest.mark.parametrize("world_size,num_branches", [(1, 1), (1, 3), (2, 2), (3, 3), (4, 2), (6, 3), (8, 4), (16, 4), (2, 4), (3, 6), (4, 8)])
def test_valid_layouts_cover_every_rank_once(world_size, num_branches):
    layouts = [Layout(world_size, num_branches, r) for r in range(world_size)]
    hosted = [b for layout in layouts for b in layout.branch_indices]
    per_rank = max(1, num_branches // world_size)
    # Every branch is run by world_size * per_rank / num_branches ranks.
    assert sorted(set(hosted)) == list(range(num_branches))
    assert len(hosted) == world_size * per_rank
    for layout in layouts:
        for branch in layout.branch_indices:
            assert layout.rank in layout.branch_ranks(branch)
        assert layout.rank in layout.peer_group_ranks
        assert layout.rank in layout.branch_group_ranks


def test_several_ranks_per_branch_use_consecutive_groups():
    layout = Layout(world_size=8, num_branches=2, rank=5)
    assert layout.ranks_per_branch == 4
    assert layout.branch_indices == (1,)
    assert layout.position == 1
    assert layout.all_branch_groups() == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert layout.all_peer_groups() == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert layout.peer_group_ranks == (1, 5)


def test_several_branches_per_rank_run_in_turn():
    layout = Layout(world_size=2, num_branches=6, rank=1)
    assert layout.branches_per_rank == 3
    assert layout.branch_indices == (3, 4, 5)
    assert layout.position == 0
    assert layout.all_peer_groups() == [(0, 1)]
    assert layout.all_branch_groups() == [(0,), (1,)]


def test_single_gpu_mode_hosts_all_branches():
    layout = Layout(world_size=1, num_branches=3, rank=0)
    assert layout.branch_indices == (0, 1, 2)


@pytest.mark.parametrize("world_size,num_branches", [(3, 2), (4, 3), (6, 4), (5, 3), (2, 3)])
def test_invalid_layout_names_sizes_that_fit(world_size, num_branches):
    with pytest.raises(TopologyError) as error:
        validate_layout(world_size, num_branches)
    message = str(error.value)
    assert f"W={world_size}" in message
    assert f"d={num_branches}" in message
    assert "World sizes that fit" in message
    fitting = [w for w in range(1, 9) if w % num_branches == 0 or num_branches % w == 0]
    assert ", ".join(map(str, fitting)) in message


@pytest.mark.parametrize("world_size,num_branches", [(0, 2), (2, 0), (2, -1)])
def test_nonpositive_sizes_rejected(world_size, num_branches):
    with pytest.raises(TopologyError, match=">= 1"):
        validate_layout(world_size, num_branches)


def test_rank_out_of_range_rejected():
    with pytest.raises(TopologyError, match="rank must lie"):
        Layout(world_size=2, num_branches=2, rank=2)
