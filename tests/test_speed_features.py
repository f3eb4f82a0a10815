"""The speed features (bf16 autocast, channels-last, torch.compile) keep the average step's guarantees.

Behaviour only, no timings. Multi-process cases run real gloo groups on loopback.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_group
from workers import branch_batch, init_group, small_net, snapshot


def train_steps(lookaround, steps: int, bf16: bool, memory_format=torch.contiguous_format) -> None:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for step in range(steps):
        for branch in lookaround.branches:
            images, labels = branch_batch(branch.index, step, lookaround.topology.position)
            with autocast:
                loss = nn.functional.cross_entropy(branch.model(images.contiguous(memory_format=memory_format)), labels)
            branch.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            branch.optimizer.step()


def speed_worker(rank, world_size, port, out_dir, num_branches, steps, bf16, channels_last):
    """Train one round under the requested features, record every state, then average and record again."""
    import torch.distributed as dist

    from lookaround_dist import Lookaround, Topology

    init_group(rank, world_size, port)
    torch.manual_seed(rank)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    lookaround = Lookaround(small_net, Topology.create(num_branches), k=steps + 1, memory_format=memory_format)
    for branch in lookaround.branches:
        branch.optimizer = torch.optim.SGD(branch.module.parameters(), lr=0.1, momentum=0.9)
    train_steps(lookaround, steps, bf16, memory_format)
    before = {b.index: snapshot(b.module) for b in lookaround.branches}
    lookaround.average()
    after = {b.index: snapshot(b.module) for b in lookaround.branches}
    channels_last_after = {
        b.index: b.module[0].weight.is_contiguous(memory_format=torch.channels_last) for b in lookaround.branches
    }
    torch.save({"before": before, "after": after, "channels_last_after": channels_last_after,
                "branches": list(lookaround.topology.branch_indices)}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("bf16, channels_last", [(True, False), (False, True), (True, True)],
                         ids=["bf16", "channels-last", "bf16-channels-last"])
def test_average_guarantees_hold(tmp_path, bf16, channels_last):
    results = run_group(speed_worker, 2, tmp_path, num_branches=2, steps=3, bf16=bf16, channels_last=channels_last)
    before = [results[rank]["before"][rank] for rank in range(2)]
    after = [results[rank]["after"][rank] for rank in range(2)]
    param_names = [n for n in before[0] if "running" not in n and "num_batches" not in n]
    buffer_names = [n for n in before[0] if "running" in n]
    assert any(not torch.equal(before[0][n], before[1][n]) for n in param_names)

    # Both ranks hold bitwise equal parameters and buffers after the average step.
    for name in after[0]:
        assert torch.equal(after[1][name], after[0][name]), name
    # Autocast leaves the stored weights in float32.
    for name in param_names + buffer_names:
        assert after[0][name].dtype == torch.float32, name
    # Parameters and running statistics are the mean of the two branches.
    for name in param_names + buffer_names:
        expected = (before[0][name] + before[1][name]) / 2
        assert torch.equal(after[0][name], expected), name
    # The integer buffer is checked, not averaged.
    assert after[0]["1.num_batches_tracked"].item() == 3
    # The convolution weight keeps its memory format through the average step.
    for rank in range(2):
        assert results[rank]["channels_last_after"][rank] == channels_last


@pytest.mark.timeout(300)
def test_sequential_bf16_matches_parallel(tmp_path):
    sequential = run_group(speed_worker, 1, tmp_path / "w1", num_branches=3, steps=3, bf16=True, channels_last=False)
    parallel = run_group(speed_worker, 3, tmp_path / "w3", num_branches=3, steps=3, bf16=True, channels_last=False)
    hosted = sequential[0]["after"]
    assert sequential[0]["branches"] == [0, 1, 2]
    # Every branch trains the same batches under the same autocast in both layouts, so
    # only the order of the sum over three branches may differ: float32 tolerance.
    for name, tensor in parallel[0]["after"][0].items():
        torch.testing.assert_close(hosted[0][name], tensor, rtol=1e-5, atol=1e-6)
    for branch in (1, 2):
        for name in hosted[0]:
            assert torch.equal(hosted[branch][name], hosted[0][name]), (branch, name)


def compile_unavailable_reason() -> str:
    """Return why torch.compile cannot run here, or an empty string when it can."""
    try:
        compiled = torch.compile(lambda x: torch.relu(x) + 1)
        compiled(torch.randn(4))
    except Exception as error:  # the toolchain fails in many ways: no compiler, no headers
        return f"torch.compile does not work on this machine: {type(error).__name__}: {error}"
    return ""


def train_sequential_consensus(compile_model: bool) -> dict:
    from lookaround_dist import Lookaround, Topology

    torch.manual_seed(0)
    lookaround = Lookaround(small_net, Topology.create(2), k=3)
    for branch in lookaround.branches:
        branch.optimizer = torch.optim.SGD(branch.module.parameters(), lr=0.1, momentum=0.9)
        if compile_model:
            branch.model = torch.compile(branch.model)
    train_steps(lookaround, 2, bf16=False)
    lookaround.average()
    return snapshot(lookaround.consensus)


@pytest.mark.timeout(600)
def test_compile_matches_eager_consensus():
    reason = compile_unavailable_reason()
    if reason:
        pytest.skip(reason)
    eager = train_sequential_consensus(compile_model=False)
    compiled = train_sequential_consensus(compile_model=True)
    # Inductor fuses and reorders float32 arithmetic, so results agree to rounding only.
    for name, tensor in eager.items():
        torch.testing.assert_close(compiled[name], tensor, rtol=1e-4, atol=1e-5)
