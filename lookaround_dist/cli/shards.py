"""``lookaround-shards``: pack an ImageFolder tree into shards, write DALI index files, verify shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import shards
from ..data.sources import DataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookaround-shards",
        description="Pack, index and verify webdataset shards (<key>.jpg + <key>.cls).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    pack = commands.add_parser("pack", help="write an ImageFolder tree as shuffled plain tar shards")
    pack.add_argument("image_folder", type=Path, help="folder with one subfolder of images per class")
    pack.add_argument("output_dir", type=Path, help="folder for the shards; existing files are never overwritten")
    pack.add_argument("--samples-per-shard", type=int, default=5000, help="samples in each shard (default 5000)")
    pack.add_argument("--seed", type=int, default=0, help="seed of the shuffle before packing (default 0)")
    pack.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")

    index = commands.add_parser("index", help="write a DALI index file (<shard>.idx) for each plain tar")
    index.add_argument("shards", nargs="+", type=Path, help="shard files (.tar; .tar.gz only with --decompress)")
    index.add_argument("--output-dir", type=Path, default=None,
                       help="folder for index files and decompressed tars (default: beside each shard)")
    index.add_argument("--decompress", action="store_true",
                       help="decompress .tar.gz shards into --output-dir (required for them) and index the copies")

    verify = commands.add_parser("verify", help="check sample counts, image decoding, labels and components")
    verify.add_argument("shards", nargs="+", type=Path, help="shard files (.tar or .tar.gz)")
    verify.add_argument("--num-classes", type=int, default=None, help="labels must lie in [0, N)")
    return parser


def run_pack(args: argparse.Namespace) -> int:
    written = shards.pack_image_folder(args.image_folder, args.output_dir,
                                       samples_per_shard=args.samples_per_shard, seed=args.seed,
                                       prefix=args.prefix)
    print(f"wrote {len(written)} shard(s) to {args.output_dir}")
    return 0


def run_index(args: argparse.Namespace) -> int:
    for shard in args.shards:
        if not shard.is_file():
            raise DataError(f"shard not found: {shard}")
        if shards.is_compressed(shard):
            if not (args.decompress and args.output_dir):
                raise DataError(
                    f"{shard} is gzip-compressed and DALI reads plain tars only; pass "
                    f"--decompress --output-dir DIR to write a plain copy and index it there"
                )
            plain = args.output_dir / shard.name.removesuffix(".gz").removesuffix(".tgz")
            if plain.suffix != ".tar":
                plain = plain.with_suffix(".tar")
            if plain.exists():
                raise FileExistsError(f"{plain} already exists; remove it or choose another --output-dir")
            shards.decompress_shard(shard, plain)
            print(f"decompressed {shard} -> {plain}")
            shard = plain
        folder = args.output_dir if args.output_dir else shard.parent
        index_path = folder / f"{shard.name}.idx"
        shards.write_dali_index(shard, index_path)
        print(f"indexed {shard} -> {index_path}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    total = bad = 0
    for shard in args.shards:
        if not shard.is_file():
            print(f"{shard}: not found")
            bad += 1
            continue
        report = shards.verify_shard(shard, args.num_classes)
        total += report.samples
        bad += len(report.problems)
        print(f"{shard}: {report.samples} samples, {len(report.problems)} problem(s)")
        for problem in report.problems:
            print(f"  {problem}")
    print(f"total: {total} samples in {len(args.shards)} shard(s), {bad} problem(s)")
    return 1 if bad else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"pack": run_pack, "index": run_index, "verify": run_verify}
    try:
        return handlers[args.command](args)
    except (DataError, FileExistsError, ValueError) as error:
        print(f"lookaround-shards {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
