"""Compare the input throughput of DALI's CPU pipeline with the torchvision DataLoader backend.

Both backends read the same shards with the same batch size and the same number of CPU
threads (DALI) or worker processes (torchvision), one branch, for each augmentation. The
first batch of each run is left out of the timing, so pipeline builds and worker start-up
do not count. Prints one table with images per second and the DALI/torchvision ratio.

    python scripts/bench_input.py --threads 2 --cifar-images 2560 --imagenet-images 384
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lookaround_dist.data import augment
from lookaround_dist.data.base import Placement
from lookaround_dist.data.dali_backend import DaliTrainData
from lookaround_dist.data.sources import open_index
from lookaround_dist.data.torchvision_backend import TorchvisionTrainData

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def target_ratio(image_size: int, name: str) -> float:
    """Return the DALI/torchvision throughput ratio this project aims for."""
    if image_size > augment.SMALL_IMAGE_MAX and name in ("randaugment", "autoaugment", "trivialaugment"):
        return 1.0
    return 1.5


def images_per_second(data, images: int, batch_size: int) -> float:
    """Time ``data`` over enough steps for ``images`` images, leaving out the first batch."""
    steps = max(2, images // batch_size)
    iterator = iter(data)
    next(iterator)
    start = time.perf_counter()
    taken = 0
    for step, batches in enumerate(iterator, start=1):
        taken += len(batches[0][1])
        if step >= steps - 1:
            break
    elapsed = time.perf_counter() - start
    return taken / elapsed


def measure(path: str, image_size: int, name: str, args, cache_dir: Path) -> tuple[float, float, float]:
    """Median DALI and torchvision rates over ``args.repeats`` repetitions, and the median of
    the per-repetition ratios. The order of the two backends alternates between repetitions,
    so that a change of machine load hits both alike."""
    index = open_index(path)
    placement = Placement(branch_indices=(0,), position=0, ranks_per_branch=1, rank=0, world_size=1,
                          seed=0)
    common = dict(index=index, placement=placement, augmentations=[name], image_size=image_size,
                  batch_size=args.batch_size, mean=MEAN, std=STD)

    def dali_rate() -> float:
        dali = DaliTrainData(path=path, num_threads=args.threads, cache_dir=cache_dir, **common)
        rate = images_per_second(dali, args.images[image_size], args.batch_size)
        dali.close()
        return rate

    def torchvision_rate() -> float:
        torchvision = TorchvisionTrainData(num_workers=args.threads, **common)
        return images_per_second(torchvision, args.images[image_size], args.batch_size)

    dali_rates, torchvision_rates = [], []
    for repeat in range(args.repeats):
        if repeat % 2 == 0:
            dali_rates.append(dali_rate())
            torchvision_rates.append(torchvision_rate())
        else:
            torchvision_rates.append(torchvision_rate())
            dali_rates.append(dali_rate())
    ratios = [d / t for d, t in zip(dali_rates, torchvision_rates)]
    return statistics.median(dali_rates), statistics.median(torchvision_rates), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                        help="folder with cifar10/ and imagenet-samples/ shards")
    parser.add_argument("--threads", type=int, default=2,
                        help="DALI CPU threads and torchvision DataLoader workers (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--cifar-images", type=int, default=2560, help="timed images per CIFAR run")
    parser.add_argument("--imagenet-images", type=int, default=384, help="timed images per ImageNet run")
    parser.add_argument("--augmentations", default=",".join(augment.AUGMENTATIONS),
                        help="comma-separated augmentation names (default: all)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="repetitions per row; rates and ratio are medians (default 1)")
    parser.add_argument("--datasets", default="cifar10,imagenet-samples",
                        help="comma-separated data sets to measure (default: both)")
    args = parser.parse_args()
    args.images = {32: args.cifar_images, 224: args.imagenet_images}
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    cifar = str(args.data_dir / "cifar10" / "train-000000.tar.gz")
    imagenet = ",".join(str(p) for p in sorted((args.data_dir / "imagenet-samples").glob("samples-*.tar")))
    datasets = [(name, path, size) for name, path, size in
                (("cifar10", cifar, 32), ("imagenet-samples", imagenet, 224))
                if name in args.datasets.split(",")]

    print(f"# {datetime.date.today()} | {platform.processor() or platform.machine()} | "
          f"{torch.get_num_threads()} torch thread(s) | threads/workers={args.threads} | "
          f"batch={args.batch_size} | repeats={args.repeats} | CUDA available: {torch.cuda.is_available()}")
    print("| data | size | augmentation | DALI img/s | torchvision img/s | ratio | target | met |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="bench-input-") as cache:
        for data_name, path, image_size in datasets:
            for name in args.augmentations.split(","):
                dali_rate, torchvision_rate, ratio = measure(path, image_size, name, args, Path(cache))
                target = target_ratio(image_size, name)
                print(f"| {data_name} | {image_size} | {name} | {dali_rate:.0f} | {torchvision_rate:.0f} | "
                      f"{ratio:.2f} | {target:.1f} | {'yes' if ratio >= target else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
