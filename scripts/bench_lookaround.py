"""Measure Lookaround's training speed and memory against its baselines, side by side in one run.

Rows, each a ratio of two measurements taken in the same run with interleaved repetitions:

* P1: images/s of Lookaround (W ranks, d = W branches, one rank per branch) against plain
  DDP over the same W ranks, same model and batch per rank, for several k, on in-memory
  tensors and on the demo shards through the torchvision backend.
* P2: one average step (parameters, buffers and the integer-buffer check) against
  ``torch.distributed.algorithms.model_averaging.utils.average_parameters`` on the same
  model and group, which averages parameters only.
* P3: sequential mode (W = 1, d = 3) against the authors' Lookaround optimizer, loaded
  from ``--authors-lookaround`` (their ``lookaround.py``), same model, data, batch and
  steps; images/s and test accuracy after the run.
* P4: peak memory of sequential mode against an estimate, measured in a fresh process as
  the growth of its peak resident set size.
* GPU: ResNet-50 at 224 px with bf16 autocast and channels-last on synthetic input, when
  CUDA is present, against NVIDIA's published 2,470 img/s per A100.

Run from the repository root:

    python scripts/bench_lookaround.py --authors-lookaround /path/to/lookaround.py
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import multiprocessing
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lookaround_dist import Lookaround, Topology  # noqa: E402
from lookaround_dist.data.base import Placement  # noqa: E402
from lookaround_dist.data.sources import open_index  # noqa: E402
from lookaround_dist.data.torchvision_backend import TorchvisionTrainData, decode  # noqa: E402
from lookaround_dist.models import build_model  # noqa: E402

DEMO = REPO / "demo" / "cifar10"
CIFAR_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR_STD = [0.2470, 0.2435, 0.2616]
NVIDIA_A100_RESNET50_IMAGES_PER_SECOND = 2470.0
"""NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5, mixed precision, one A100 80GB."""


# ----- data ----------------------------------------------------------------------------
def load_demo(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the demo subset's ``split`` shards into a uint8 NCHW tensor and int64 labels."""
    spec = ",".join(str(p) for p in sorted(DEMO.glob(f"{split}-*.tar.gz")))
    index = open_index(spec, 10)
    images, labels = [], []
    for sample in range(len(index)):
        blob, label = index.read(sample)
        images.append(decode(blob, index, sample))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def augment(images: torch.Tensor, branch: int, generator: torch.Generator) -> torch.Tensor:
    """Padded random crop (4 px), then the branch's flip: horizontal, vertical or none.

    Tensor operations on a whole batch, so that input costs the same small share in every
    implementation that P3 compares.
    """
    n, _, height, width = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    offsets = torch.randint(0, 9, (n, 2), generator=generator).tolist()
    crops = torch.stack([padded[i, :, y: y + height, x: x + width] for i, (y, x) in enumerate(offsets)])
    flip = torch.rand(n, generator=generator) < 0.5
    if branch % 3 == 0:
        crops[flip] = crops[flip].flip(3)
    elif branch % 3 == 1:
        crops[flip] = crops[flip].flip(2)
    return normalize(crops)


def branch_batch(images, labels, step: int, branch: int, batch: int, seed: int):
    """Return the base batch of ``step`` (the same samples for every branch) under ``branch``'s augmentation."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    picked = order[(step * batch) % len(images):][:batch]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + branch)
    return augment(images[picked], branch, generator), labels[picked]


# ----- P1 and P2: a W-rank gloo group --------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_ddp_steps(model, optimizer, batches, steps: int) -> None:
    for step in range(steps):
        images, labels = batches(step)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def train_lookaround_steps(lookaround, batches, steps: int) -> list[float]:
    """Train ``steps`` steps; return the milliseconds of each average step that ran."""
    average_ms = []
    for step in range(steps):
        for branch, (images, labels) in zip(lookaround.branches, batches(step)):
            loss = F.cross_entropy(branch.model(images), labels)
            branch.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            branch.optimizer.step()
        if lookaround.step():
            average_ms.append(lookaround.last_average.milliseconds)
    return average_ms


def timed(function) -> float:
    """Run ``function`` between two barriers; return the wall seconds, equal on every rank."""
    dist.barrier()
    started = time.perf_counter()
    function()
    dist.barrier()
    elapsed = torch.tensor([time.perf_counter() - started])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def shard_stream(data):
    """Endless steps from a TrainData, one epoch after another."""
    epoch = 0
    while True:
        data.set_epoch(epoch)
        yield from data
        epoch += 1


def group_worker(rank: int, world_size: int, port: int, out_file: str, options: dict) -> None:
    """P1 and P2 on one rank of a gloo group; rank 0 writes the results as JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=600))
    torch.manual_seed(0)
    batch, steps, ks = options["batch"], options["steps"], options["ks"]
    topology = Topology.create(num_branches=world_size)
    build = lambda: build_model("resnet20", 10)  # noqa: E731

    # Models: DDP over the world, and one Lookaround per k (the same starting weights).
    ddp_model = torch.nn.parallel.DistributedDataParallel(build())
    ddp_optimizer = torch.optim.SGD(ddp_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    lookarounds = {}
    for k in ks:
        lookaround = Lookaround(build, topology, k=k)
        for branch in lookaround.branches:
            branch.optimizer = torch.optim.SGD(branch.module.parameters(), lr=0.05, momentum=0.9,
                                               weight_decay=5e-4)
        lookarounds[k] = lookaround

    # In-memory input: a pool of ready batches, the same for every configuration.
    generator = torch.Generator().manual_seed(rank)
    pool = [(torch.randn(batch, 3, 32, 32, generator=generator),
             torch.randint(0, 10, (batch,), generator=generator)) for _ in range(4)]
    memory_inputs = {
        "ddp": lambda step: pool[step % len(pool)],
        "lookaround": lambda step: [pool[step % len(pool)]],
    }

    # Shard input: torchvision backend over the demo shards, one DataLoader worker per rank.
    spec = ",".join(str(p) for p in sorted(DEMO.glob("train-*.tar.gz")))
    index = open_index(spec, 10)
    common = dict(index=index, image_size=32, batch_size=batch, num_workers=options["workers"],
                  mean=CIFAR_MEAN, std=CIFAR_STD)
    ddp_placement = Placement(branch_indices=(0,), position=rank, ranks_per_branch=world_size,
                              rank=rank, world_size=world_size, seed=0)
    streams = {
        "ddp": shard_stream(TorchvisionTrainData(placement=ddp_placement, augmentations=["hflip"], **common)),
        "lookaround": shard_stream(TorchvisionTrainData(
            placement=Placement.from_topology(topology, 0),
            augmentations=["hflip", "vflip", "none", "rotate"][:world_size], **common)),
    }
    shard_inputs = {
        "ddp": lambda step: next(streams["ddp"])[0],
        "lookaround": lambda step: next(streams["lookaround"]),
    }

    configs = ["ddp"] + [f"k={k}" for k in ks]
    results: dict = {"memory": {c: [] for c in configs}, "shards": {c: [] for c in configs},
                     "average_ms": {f"k={k}": [] for k in ks}}

    def run(config: str, inputs: dict, count: int) -> float:
        if config == "ddp":
            return timed(lambda: train_ddp_steps(ddp_model, ddp_optimizer, inputs["ddp"], count))
        lookaround = lookarounds[int(config[2:])]
        spent = []
        seconds = timed(lambda: spent.extend(train_lookaround_steps(lookaround, inputs["lookaround"], count)))
        results["average_ms"][config].extend(spent)
        return seconds

    # Warm-up, then repetitions with the order of configurations rotated each time.
    for config in configs:
        run(config, memory_inputs, 2)
        run(config, shard_inputs, 2)
    for repetition in range(options["repetitions"]):
        shift = repetition % len(configs)
        for config in configs[shift:] + configs[:shift]:
            for source, inputs in (("memory", memory_inputs), ("shards", shard_inputs)):
                seconds = run(config, inputs, steps)
                results[source][config].append(world_size * batch * steps / seconds)

    # P2: one average step against PyTorch's model averaging of parameters alone.
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    lookaround = lookarounds[ks[0]]
    plain = build()
    results["p2"] = {"lookaround": [], "torch": []}
    calls = options["average_calls"]
    for repetition in range(options["repetitions"] + 2):
        # The trainer checks integer buffers once per epoch, so a round's average step is
        # the unchecked one.
        pair = [("lookaround", lambda: lookaround.average(check_integers=False)),
                ("torch", lambda: average_parameters(iter(plain.parameters()), topology.world_group))]
        for name, call in pair if repetition % 2 == 0 else pair[::-1]:
            seconds = timed(lambda: [call() for _ in range(calls)])
            if repetition >= 2:  # the first two repetitions are warm-up
                results["p2"][name].append(1000.0 * seconds / calls)
    results["p2_bytes"] = lookaround.last_average.bytes_reduced
    results["p2_collectives"] = lookaround.last_average.collectives
    results["p2_torch_bytes"] = sum(p.numel() * p.element_size() for p in plain.parameters())

    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def run_group(world_size: int, options: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-lookaround-") as folder:
        out_file = str(Path(folder) / "group.json")
        processes = [context.Process(target=group_worker, args=(rank, world_size, port, out_file, options))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        failed = [rank for rank, p in enumerate(processes) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"benchmark ranks {failed} failed; their tracebacks are printed above")
        return json.loads(Path(out_file).read_text())


# ----- P3: sequential mode against the authors' optimizer ------------------------------
def load_authors_optimizer(path: str):
    """Import the ``Lookaround`` class from the authors' ``lookaround.py`` at ``path``."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--authors-lookaround: {file} not found; pass the path of their lookaround.py")
    spec = importlib.util.spec_from_file_location("authors_lookaround", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Lookaround


class AuthorsRun:
    """One model whose parameters the authors' optimizer swaps between branches at each step."""

    def __init__(self, optimizer_class, num_branches: int, k: int, lr: float):
        self.num_branches = num_branches
        self.model = build_model("resnet20", 10)
        self.optimizer = optimizer_class(self.model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                                         head_num=num_branches, frequence=k)

    def train_step(self, batches) -> None:
        for images, labels in batches:
            self.optimizer.zero_grad()
            loss = F.cross_entropy(self.model(images), labels)
            loss.backward()
            self.optimizer.step()

    def consensus(self) -> torch.nn.Module:
        return self.model


class SequentialRun:
    """This package's sequential mode: every branch hosted on this one process."""

    def __init__(self, num_branches: int, k: int, lr: float, bf16: bool = False, channels_last: bool = False):
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
        self.lookaround = Lookaround(lambda: build_model("resnet20", 10), Topology.create(num_branches), k=k,
                                     memory_format=self.memory_format)
        for branch in self.lookaround.branches:
            branch.optimizer = torch.optim.SGD(branch.module.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def train_step(self, batches) -> None:
        for branch, (images, labels) in zip(self.lookaround.branches, batches):
            with self.autocast:
                loss = F.cross_entropy(branch.model(images.contiguous(memory_format=self.memory_format)), labels)
            branch.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            branch.optimizer.step()
        self.lookaround.step()

    def consensus(self) -> torch.nn.Module:
        return self.lookaround.consensus


@torch.no_grad()
def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), 250):
        logits = model(normalize(images[start: start + 250]))
        correct += int((logits.argmax(1) == labels[start: start + 250]).sum())
    model.train()
    return 100.0 * correct / len(images)


def run_sequential(args, seed: int) -> dict:
    """Train every P3 implementation on the same batches of one seed, one round at a time in turn."""
    torch.set_num_threads(1)
    train_images, train_labels = load_demo("train")
    test_images, test_labels = load_demo("test")
    num_branches, k = 3, 5
    torch.manual_seed(seed)  # sets the starting weights, which every implementation copies below
    runs = {"ours fp32": SequentialRun(num_branches, k, args.lr),
            "ours fp32 channels-last": SequentialRun(num_branches, k, args.lr, channels_last=True),
            "ours bf16 channels-last": SequentialRun(num_branches, k, args.lr, bf16=True, channels_last=True)}
    if args.authors_lookaround:
        runs["authors fp32"] = AuthorsRun(load_authors_optimizer(args.authors_lookaround), num_branches, k, args.lr)
    for run in runs.values():  # the same starting weights everywhere
        run.consensus().load_state_dict(runs["ours fp32"].consensus().state_dict())
        if isinstance(run, SequentialRun):
            run.lookaround.averager.broadcast_from_first()

    seconds = {name: 0.0 for name in runs}
    steps = args.p3_steps - args.p3_steps % k
    names = list(runs)
    for round_index in range(steps // k):
        shift = round_index % len(names)
        batches_per_step = [[branch_batch(train_images, train_labels, step, b, args.p3_batch, seed)
                             for b in range(num_branches)]
                            for step in range(round_index * k, (round_index + 1) * k)]
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            for batches in batches_per_step:
                runs[name].train_step(batches)
            seconds[name] += time.perf_counter() - started
    images = steps * args.p3_batch * num_branches
    return {name: {"images_per_second": images / seconds[name],
                   "top1": top1(runs[name].consensus(), test_images, test_labels)}
            for name in runs}


def run_sequential_seeds(args) -> dict:
    """Run P3 for every seed of ``--p3-seeds`` and collect each implementation's img/s and top-1 per seed."""
    results: dict = {"steps": args.p3_steps - args.p3_steps % 5, "seeds": args.p3_seeds}
    for seed in args.p3_seeds:
        for name, result in run_sequential(args, seed).items():
            entry = results.setdefault(name, {"images_per_second": [], "top1": []})
            entry["images_per_second"].append(result["images_per_second"])
            entry["top1"].append(result["top1"])
    return results


# ----- P4: peak memory of sequential mode ----------------------------------------------
def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; return whether Linux allowed it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def activation_bytes(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass (an estimate of activations)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    existing = {p.untyped_storage().data_ptr() for p in model.parameters()}
    existing.add(images.untyped_storage().data_ptr())
    return sum(size for pointer, size in seen.items() if pointer not in existing)


def memory_child(batch: int, num_branches: int, steps: int) -> dict:
    """Run in a fresh process: grow the peak RSS by sequential mode, compare with the estimate."""
    torch.set_num_threads(1)
    k = 5
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    # A probe at a small batch loads the kernels before the baseline without raising the
    # peak by a full batch's activations, which grow linearly with the batch.
    probe = build_model("resnet20", 10)
    probe_batch = 8
    activations = activation_bytes(probe, images[:probe_batch].clone(), labels[:probe_batch]) * batch // probe_batch
    state_bytes = sum(t.numel() * t.element_size() for t in list(probe.parameters()) + list(probe.buffers()))
    parameter_bytes = sum(p.numel() * p.element_size() for p in probe.parameters())
    del probe
    # Without the reset, a transient peak during start-up can hide the growth.
    reset = reset_peak_rss()
    baseline = peak_rss_bytes()

    run = SequentialRun(num_branches, k, lr=0.05)
    for step in range(steps):
        run.train_step([(images, labels)] * num_branches)
    growth = peak_rss_bytes() - baseline

    # Weights, gradients and momentum of every hosted branch, the averaging buffers, and
    # one branch's saved activations (branches run one after another).
    estimate = (num_branches * (state_bytes + 2 * parameter_bytes) + state_bytes + activations)
    return {"growth": growth, "estimate": estimate, "activations": activations,
            "branch_bytes": state_bytes + 2 * parameter_bytes, "batch": batch, "peak_reset": reset}


def run_memory(batch: int) -> dict:
    """Measure d = 3, d = 1 (one branch's real peak) and d = 3 under a fixed glibc mmap threshold.

    glibc raises its mmap threshold each time a large block is freed, so freed
    activations stay in the heap and count in the RSS. A fixed threshold of 128 KiB
    hands every large block back to the kernel when it is freed.
    """
    results = {}
    for name, num_branches, extra in (("d3", 3, {}), ("d1", 1, {}),
                                      ("d3 fixed mmap", 3, {"MALLOC_MMAP_THRESHOLD_": "131072"})):
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(batch),
                   "--memory-branches", str(num_branches)]
        output = subprocess.run(command, check=True, capture_output=True, text=True,
                                env=os.environ | extra).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
    return results


# ----- GPU -----------------------------------------------------------------------------
def run_gpu(steps: int = 30, batch: int = 256) -> dict:
    """ResNet-50 at 224 px, bf16 autocast, channels-last, synthetic input on the GPU (d = 1)."""
    device = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    lookaround = Lookaround(lambda: build_model("resnet50", 1000), Topology.create(1), k=5, device=device,
                            memory_format=torch.channels_last)
    branch = lookaround.branches[0]
    branch.optimizer = torch.optim.SGD(branch.module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    images = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(branch.model(images), labels)
        branch.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        branch.optimizer.step()
        lookaround.step()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return {"images_per_second": steps * batch / (time.perf_counter() - started),
            "device": torch.cuda.get_device_name(device), "batch": batch}


# ----- report --------------------------------------------------------------------------
def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def mark(met: bool) -> str:
    return "yes" if met else "no"


def print_report(args, group: dict, sequential: dict, memory: dict, gpu) -> None:
    print(f"# {datetime.date.today()} | {platform.machine()}, {os.cpu_count()} CPU cores | "
          f"torch {torch.__version__} | CUDA available: {torch.cuda.is_available()}")
    print()
    if group is not None:
        print(f"# P1/P2: W={args.world_size} gloo ranks, one thread each, ResNet-20, batch {args.batch} per rank, "
              f"{args.steps} steps per measurement, {args.repetitions} interleaved repetitions, medians")
        print_group(args, group)
    if sequential is not None:
        print_sequential(args, sequential)
    if memory is not None:
        print_memory(memory)
    print_gpu(gpu)


def print_group(args, group: dict) -> None:
    print("| row | input | configuration | Lookaround img/s | baseline img/s | ratio | target | met |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for source in ("memory", "shards"):
        baseline = median(group[source]["ddp"])
        for k in args.ks:
            config = f"k={k}"
            rate = median(group[source][config])
            ratio = rate / baseline
            print(f"| P1 | {'in-memory tensors' if source == 'memory' else 'demo shards, torchvision'} | "
                  f"d={args.world_size}, {config} vs DDP | {rate:.0f} | {baseline:.0f} | {ratio:.3f} | 0.98 | "
                  f"{mark(ratio >= 0.98)} |")
    print()
    print("Average step cost per round (median over repetitions, in-memory runs included):")
    for k in args.ks:
        print(f"  k={k}: {median(group['average_ms'][f'k={k}']):.2f} ms per round")
    print()

    ours, theirs = median(group["p2"]["lookaround"]), median(group["p2"]["torch"])
    print("| row | measure | Lookaround | PyTorch average_parameters | ratio (theirs / ours) | target | met |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| P2 | ms per average step, ResNet-20, W={args.world_size} | {ours:.2f} "
          f"({group['p2_collectives']} collectives, {group['p2_bytes'] / 1e6:.2f} MB) | {theirs:.2f} "
          f"(1 collective, {group['p2_torch_bytes'] / 1e6:.2f} MB) | {theirs / ours:.2f} | >= 1.0 | "
          f"{mark(ours <= theirs)} |")
    print()


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def print_sequential(args, sequential: dict) -> None:
    seeds = sequential["seeds"]
    print(f"# P3: W=1, d=3, k=5, ResNet-20, batch {args.p3_batch} per branch, {sequential['steps']} steps "
          f"on the demo training subset, rounds interleaved, seeds {', '.join(map(str, seeds))}; "
          f"img/s is the median over seeds, top-1 on the 1,000 demo test images is mean +- standard deviation")
    print("| row | implementation | img/s | top-1 % | img/s ratio to authors | target | met |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    authors = sequential.get("authors fp32")
    for name, result in sequential.items():
        if name in ("steps", "seeds"):
            continue
        rate = median(result["images_per_second"])
        top1_mean, top1_spread = mean_and_spread(result["top1"])
        if authors is None:
            ratio_text, met = "n/a", "n/a"
        else:
            ratio = rate / median(authors["images_per_second"])
            ratio_text, met = f"{ratio:.2f}", ("" if name == "authors fp32" else mark(ratio >= 1.2))
        print(f"| P3 | {name} | {rate:.0f} | {top1_mean:.1f} +- {top1_spread:.1f} | {ratio_text} | "
              f"{'' if name == 'authors fp32' else '1.2'} | {met} |")
    if authors is None:
        print("P3 authors row skipped: pass --authors-lookaround PATH (their lookaround.py) to include it")
    else:
        # Same accuracy within noise means a gap of the means under two standard errors of
        # that gap, estimated from the spread over seeds.
        theirs_mean, theirs_spread = mean_and_spread(authors["top1"])
        for name in ("ours fp32", "ours bf16 channels-last"):
            ours_mean, ours_spread = mean_and_spread(sequential[name]["top1"])
            error = ((ours_spread ** 2 + theirs_spread ** 2) / len(seeds)) ** 0.5
            gap = ours_mean - theirs_mean
            verdict = "within noise" if len(seeds) > 1 and abs(gap) <= 2 * error else (
                "not judged (one seed)" if len(seeds) == 1 else "outside noise")
            print(f"P3 accuracy, {name} minus authors: {gap:+.1f} points, two standard errors "
                  f"{2 * error:.1f}: {verdict}")
    print()


def print_memory(memory: dict) -> None:
    three, one, fixed = memory["d3"], memory["d1"], memory["d3 fixed mmap"]
    ratio = three["growth"] / three["estimate"]
    # The second estimate replaces the saved activations by the measured peak of a d = 1
    # run, which also counts backward's temporaries and the allocator's slack.
    measured_one = one["growth"] + 2 * three["branch_bytes"]
    print("| row | measure | measured MB | estimate MB | ratio | target | met |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| P4 | peak RSS growth, W=1, d=3, batch {three['batch']}, against weights + gradients + momentum "
          f"+ averaging buffers + one branch's saved activations | {three['growth'] / 1e6:.1f} | "
          f"{three['estimate'] / 1e6:.1f} (activations {three['activations'] / 1e6:.1f}) | {ratio:.2f} | "
          f"<= 1.1 | {mark(ratio <= 1.1)} |")
    ratio = three["growth"] / measured_one
    print(f"| P4 | the same, against the measured d=1 peak growth plus two more branches' state | "
          f"{three['growth'] / 1e6:.1f} | {measured_one / 1e6:.1f} (d=1 growth {one['growth'] / 1e6:.1f}) | "
          f"{ratio:.2f} | <= 1.1 | {mark(ratio <= 1.1)} |")
    ratio = fixed["growth"] / fixed["estimate"]
    print(f"| P4 | the first row with MALLOC_MMAP_THRESHOLD_=131072 | {fixed['growth'] / 1e6:.1f} | "
          f"{fixed['estimate'] / 1e6:.1f} | {ratio:.2f} | <= 1.1 | {mark(ratio <= 1.1)} |")
    if not three["peak_reset"]:
        print("P4: the peak RSS could not be reset, so a start-up peak may hide part of the growth")
    print()


def print_gpu(gpu) -> None:
    if gpu is None:
        print("GPU: skipped, CUDA is not available on this machine")
    else:
        ratio = gpu["images_per_second"] / NVIDIA_A100_RESNET50_IMAGES_PER_SECOND
        print(f"GPU: ResNet-50, 224 px, bf16, channels-last, batch {gpu['batch']}, {gpu['device']}: "
              f"{gpu['images_per_second']:.0f} img/s, {ratio:.2f} of NVIDIA's "
              f"{NVIDIA_A100_RESNET50_IMAGES_PER_SECOND:.0f} img/s per A100")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2, help="ranks (and branches) for P1 and P2 (default 2)")
    parser.add_argument("--batch", type=int, default=32, help="images per rank and step in P1 (default 32)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per P1 measurement (default 20)")
    parser.add_argument("--ks", default="1,2,5,10", help="comma-separated k values for P1 (default 1,2,5,10)")
    parser.add_argument("--repetitions", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank for shards (default 1)")
    parser.add_argument("--average-calls", type=int, default=20, help="average steps per P2 measurement (default 20)")
    parser.add_argument("--authors-lookaround", default="",
                        help="path of the authors' lookaround.py (github.com/Ardcy/Lookaround); P3 skips it if empty")
    parser.add_argument("--p3-steps", type=int, default=50, help="training steps in P3, rounded down to a multiple of k=5 (default 50)")
    parser.add_argument("--p3-batch", type=int, default=64, help="images per branch and step in P3 (default 64)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate in P3 (default 0.05)")
    parser.add_argument("--p3-seeds", type=int, nargs="+", default=[0],
                        help="seeds of P3 (starting weights, sample order, augmentation); "
                             "several give the spread of top-1 (default 0)")
    parser.add_argument("--memory-batch", type=int, default=128, help="batch per branch in P4 (default 128)")
    parser.add_argument("--rows", default="p1,p2,p3,p4,gpu",
                        help="comma-separated rows to run: p1 and p2 (run together), p3, p4, gpu (default all)")
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--memory-branches", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.memory_branches, steps=6)))
        return
    args.ks = [int(k) for k in args.ks.split(",")]
    options = {"batch": args.batch, "steps": args.steps, "ks": args.ks, "repetitions": args.repetitions,
               "workers": args.workers, "average_calls": args.average_calls}
    rows = set(args.rows.split(","))
    started = time.perf_counter()
    group = run_group(args.world_size, options) if rows & {"p1", "p2"} else None
    sequential = run_sequential_seeds(args) if "p3" in rows else None
    memory = run_memory(args.memory_batch) if "p4" in rows else None
    gpu = run_gpu() if "gpu" in rows and torch.cuda.is_available() else None
    print_report(args, group, sequential, memory, gpu)
    print(f"\n# total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
