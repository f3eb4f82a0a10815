"""Finding and indexing training data: webdataset shards and ImageFolder trees.

A webdataset shard is a tar of samples ``<key>.jpg`` + ``<key>.cls`` (the class index as
ASCII decimal text). Shards are indexed once at start into a random-access
:class:`SampleIndex`, so that the sampler can ask for any sample by number: plain tars are
read by member offset, gzip-compressed tars are decompressed into memory (fine for data
sets of CIFAR size; large data belongs in plain tars). An ImageFolder tree holds one
folder per class, classes numbered in sorted order.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import tarfile
from pathlib import Path
from typing import Optional

import braceexpand

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class DataError(ValueError):
    """Missing, empty or malformed input data."""


def is_shard(path: str | Path) -> bool:
    return str(path).endswith(SHARD_SUFFIXES)


def expand_shards(spec: str) -> list[Path]:
    """Resolve a shard spec to existing shard files.

    ``spec`` is a shard file, a brace pattern (``train-{000000..000009}.tar``), a
    comma-separated list of these, or a folder whose ``*.tar``/``*.tar.gz`` files are taken
    in sorted order.
    """
    if not spec:
        raise DataError("no data path given (data.train_path / data.val_path is empty)")
    paths: list[Path] = []
    for part in spec.split(","):
        part = part.strip()
        path = Path(part)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if is_shard(p))
            if not found:
                raise DataError(f"folder {path} contains no shards (*.tar, *.tar.gz)")
            paths.extend(found)
            continue
        for name in braceexpand.braceexpand(part):
            candidate = Path(name)
            if not candidate.is_file():
                relative_to = "" if candidate.is_absolute() else f" (relative to {Path.cwd()})"
                raise DataError(
                    f"shard not found: {candidate}{relative_to}. "
                    f"For configs/cifar10.yaml, run 'make data-cifar10 SHARED_DATA=DIR', which writes "
                    f"plain-tar copies of the gzip-compressed CIFAR-10 shards in DIR/cifar10 to "
                    f"data/cifar10. 'lookaround-shards pack IMAGEFOLDER OUTDIR' makes shards of "
                    f"an ImageFolder tree."
                )
            paths.append(candidate)
    return paths


def is_image_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder of class folders (and no shards)."""
    path = Path(path)
    if not path.is_dir() or any(is_shard(p) for p in path.iterdir()):
        return False
    return any(p.is_dir() for p in path.iterdir())


@dataclasses.dataclass
class Sample:
    source: str
    """The shard or file the sample lives in (for error messages)."""
    key: str
    label: int
    offset: int = -1
    """Byte offset of the image inside a plain tar; -1 when read otherwise."""
    size: int = 0
    blob: Optional[bytes] = None
    """The encoded image, kept in memory for compressed shards."""


class SampleIndex:
    """Random access to the encoded images and labels of one data set."""

    def __init__(self, samples: list[Sample], num_classes: Optional[int], description: str):
        if not samples:
            raise DataError(f"{description} contains no samples")
        self.samples = samples
        self.description = description
        if num_classes is not None:
            check_labels(samples, num_classes)
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[bytes, int]:
        """Return the encoded image and the label of sample ``index``."""
        sample = self.samples[index]
        if sample.blob is not None:
            return sample.blob, sample.label
        if sample.offset < 0:
            return Path(sample.source).read_bytes(), sample.label
        # One open handle per shard and process; DataLoader workers each get their own
        # after fork because handles are opened lazily.
        handle = self._handles.get(sample.source)
        if handle is None or getattr(handle, "_pid", None) != os.getpid():
            handle = open(sample.source, "rb")
            handle._pid = os.getpid()  # type: ignore[attr-defined]
            self._handles[sample.source] = handle
        handle.seek(sample.offset)
        return handle.read(sample.size), sample.label

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.samples]


def check_labels(samples: list[Sample], num_classes: int) -> None:
    for sample in samples:
        if not 0 <= sample.label < num_classes:
            raise DataError(
                f"label {sample.label} of key {sample.key} in {sample.source} is out of range: "
                f"model.num_classes={num_classes} allows 0..{num_classes - 1}"
            )


def _split_member(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    if "." not in base:
        return name, ""
    stem, extension = base.split(".", 1)
    return os.path.join(os.path.dirname(name), stem), extension.lower()


def index_shard(path: Path) -> list[Sample]:
    """Index one tar shard; errors name the shard and the key."""
    compressed = str(path).endswith((".gz", ".tgz"))
    images: dict[str, tuple] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    try:
        if compressed:
            with gzip.open(path, "rb") as handle:
                data = handle.read()
            archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        else:
            archive = tarfile.open(path, mode="r:")
        with archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = _split_member(member.name)
                if extension in ("jpg", "jpeg", "png", "webp"):
                    if key not in images and key not in labels:
                        order.append(key)
                    if compressed:
                        images[key] = (-1, member.size, archive.extractfile(member).read())
                    else:
                        images[key] = (member.offset_data, member.size, None)
                elif extension == "cls":
                    if key not in images and key not in labels:
                        order.append(key)
                    text = archive.extractfile(member).read().decode("ascii", "replace").strip()
                    try:
                        labels[key] = int(text)
                    except ValueError:
                        raise DataError(
                            f"key {key} in {path}: .cls must hold the class index as ASCII "
                            f"decimal text, found {text[:20]!r}"
                        ) from None
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"cannot read shard {path}: {error}") from None

    samples = []
    for key in order:
        if key not in images:
            raise DataError(f"key {key} in {path} has a .cls but no image (.jpg)")
        if key not in labels:
            raise DataError(f"key {key} in {path} has an image but no .cls label")
        offset, size, blob = images[key]
        samples.append(Sample(str(path), key, labels[key], offset, size, blob))
    return samples


def index_image_folder(root: Path) -> list[Sample]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                key = f"{name}/{file.stem}"
                samples.append(Sample(str(file), key, label, -1, file.stat().st_size, None))
    return samples


def open_index(spec: str, num_classes: Optional[int] = None) -> SampleIndex:
    """Index the data named by ``spec`` (shards or an ImageFolder tree), checking labels."""
    if spec and is_image_folder(spec):
        return SampleIndex(index_image_folder(Path(spec)), num_classes, f"ImageFolder tree {spec}")
    shards = expand_shards(spec)
    samples: list[Sample] = []
    for shard in shards:
        samples.extend(index_shard(shard))
    return SampleIndex(samples, num_classes, f"shards {spec}")
