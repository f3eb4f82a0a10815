"""Cut the demo's CIFAR-10 subset out of full CIFAR-10 webdataset shards.

Takes the first N images of every class, in shard order, from the full training and test
shards, shuffles them with a fixed seed, and writes gzip-compressed webdataset shards
(``<key>.jpg`` + ``<key>.cls``). Used once to make ``demo/cifar10/``; rerun it to make a
subset of another size:

    python scripts/make_demo_subset.py --source PATH/TO/cifar10 --output demo/cifar10
"""

from __future__ import annotations

import argparse
import io
import random
import tarfile
from pathlib import Path


def read_samples(shards: list[Path]) -> list[tuple[str, bytes, int]]:
    samples = []
    for shard in shards:
        images, labels = {}, {}
        with tarfile.open(shard) as archive:
            for member in archive:
                key, extension = member.name.rsplit(".", 1)
                data = archive.extractfile(member).read()
                if extension == "jpg":
                    images[key] = data
                elif extension == "cls":
                    labels[key] = int(data.decode("ascii").strip())
        samples.extend((key, images[key], labels[key]) for key in images)
    return samples


def balanced_subset(samples, per_class: int, seed: int):
    chosen, counts = [], {}
    for key, image, label in samples:
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            chosen.append((key, image, label))
    random.Random(seed).shuffle(chosen)
    return chosen


def write_shards(samples, output: Path, prefix: str, num_shards: int) -> None:
    per_shard = -(-len(samples) // num_shards)
    for index in range(num_shards):
        path = output / f"{prefix}-{index:06d}.tar.gz"
        if path.exists():
            raise SystemExit(f"{path} exists; remove it first or choose another --output")
        with tarfile.open(path, "w:gz") as archive:
            for key, image, label in samples[index * per_shard:(index + 1) * per_shard]:
                for extension, data in (("jpg", image), ("cls", str(label).encode("ascii"))):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    info.mtime = 0
                    archive.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="folder of the full CIFAR-10 shards")
    parser.add_argument("--output", required=True, help="folder for the subset's shards")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--train-shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    source, output = Path(args.source), Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    train = balanced_subset(read_samples(sorted(source.glob("train-*.tar*"))), args.train_per_class, args.seed)
    test = balanced_subset(read_samples(sorted(source.glob("test-*.tar*"))), args.test_per_class, args.seed)
    write_shards(train, output, "train", args.train_shards)
    write_shards(test, output, "test", 1)
    print(f"wrote {len(train)} training and {len(test)} test samples to {output}")


if __name__ == "__main__":
    main()
