"""Packing, indexing and verifying webdataset shards.

A shard is a plain or gzip-compressed tar of samples ``<key>.jpg`` + ``<key>.cls``, the
label as ASCII decimal text. DALI's ``fn.readers.webdataset`` reads plain tars only and
wants an index file per tar: a header line ``v1.2 <num_samples>``, then one line per
sample listing ``<extension> <data offset> <size> <member name>`` for each of its
components. :func:`write_dali_index` writes that format from Python's ``tarfile``, so no
external ``tar`` binary or DALI tool is needed.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import random
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator, Optional


from .data.sources import IMAGE_EXTENSIONS, DataError, index_image_folder
from .data.torchvision_backend import decode_rgb

DALI_INDEX_VERSION = "v1.2"
IMAGE_COMPONENTS = ("jpg", "jpeg", "png", "webp")


def is_compressed(path: str | Path) -> bool:
    return str(path).endswith((".gz", ".tgz"))


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name into sample key and extension at the first dot of its basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


# ---------------------------------------------------------------------------------------
# Packing


def pack_image_folder(root: str | Path, output_dir: str | Path, samples_per_shard: int = 5000,
                      seed: int = 0, prefix: str = "shard") -> list[Path]:
    """Write the images of an ImageFolder tree as shuffled shards ``<prefix>-NNNNNN.tar``.

    Samples are shuffled once with ``seed`` before packing, because DALI and webdataset read
    each tar in stored order and shuffle only inside a buffer. Labels are the class folders'
    indices in sorted order, as in :func:`lookaround_dist.data.sources.index_image_folder`.
    Existing files in ``output_dir`` are never overwritten: a name clash raises
    :class:`FileExistsError` before anything is written.
    """
    root = Path(root)
    output_dir = Path(output_dir)
    if samples_per_shard < 1:
        raise ValueError(f"samples per shard must be >= 1, found {samples_per_shard}")
    if not root.is_dir():
        raise DataError(f"ImageFolder tree not found: {root}")
    samples = index_image_folder(root)
    if not samples:
        raise DataError(f"{root} contains no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders")
    random.Random(seed).shuffle(samples)

    num_shards = -(-len(samples) // samples_per_shard)
    names = [output_dir / f"{prefix}-{number:06d}.tar" for number in range(num_shards)]
    clashes = [str(path) for path in names if path.exists()]
    if clashes:
        raise FileExistsError(
            f"{len(clashes)} shard file(s) already exist in {output_dir}, first {clashes[0]}; "
            f"choose an empty output folder or remove them"
        )
    output_dir.mkdir(parents=True, exist_ok=True)

    for number, path in enumerate(names):
        chunk = samples[number * samples_per_shard:(number + 1) * samples_per_shard]
        # Mode "x" fails instead of overwriting a file that appeared since the check above.
        with open(path, "xb") as handle, tarfile.open(fileobj=handle, mode="w:") as archive:
            for sample in chunk:
                source = Path(sample.source)
                # Keys carry no dots or slashes so that the key/extension split is unambiguous.
                key = sample.key.replace("/", "_").replace(".", "_")
                extension = "jpg" if source.suffix.lower() in (".jpg", ".jpeg") else source.suffix.lower()[1:]
                _add_member(archive, f"{key}.{extension}", source.read_bytes())
                _add_member(archive, f"{key}.cls", str(sample.label).encode("ascii"))
    return names


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------
# DALI index files and decompression


def iter_tar_components(path: str | Path) -> Iterator[tuple[str, str, int, int]]:
    """Yield ``(key, extension, data offset, size)`` for each regular file of a plain tar."""
    with tarfile.open(path, mode="r:") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, extension = split_member_name(member.name)
            yield key, extension, member.offset_data, member.size


def dali_index_text(path: str | Path) -> str:
    """Return the DALI index file of a plain tar as text.

    Components belong to one sample while their key repeats on consecutive members, the
    rule DALI's reader applies. Hidden members (a basename starting with a dot) are left
    out, as DALI does.
    """
    if is_compressed(path):
        raise DataError(f"{path} is gzip-compressed; DALI reads plain tars only, decompress it first")
    bundles: list[list[str]] = []
    last_key = None
    try:
        for key, extension, offset, size in iter_tar_components(path):
            name = f"{key}.{extension}" if extension else key
            if not key or key.endswith("/"):
                continue
            if any(character.isspace() for character in name):
                raise DataError(
                    f"member {name!r} of {path} contains whitespace, which the DALI index "
                    f"format cannot represent; rename the member"
                )
            component = f"{extension} {offset} {size} {name}"
            if key != last_key:
                bundles.append([component])
                last_key = key
            else:
                bundles[-1].append(component)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"cannot read shard {path}: {error}") from None
    if not bundles:
        raise DataError(f"shard {path} contains no samples")
    lines = [f"{DALI_INDEX_VERSION} {len(bundles)}"] + [" ".join(bundle) for bundle in bundles]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, write) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it into place.

    Several ranks of one node may prepare the same cache file at once; each writes its own
    temporary file and the rename makes whichever finishes last the (identical) result.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            write(handle)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_dali_index(shard: str | Path, index_path: str | Path) -> Path:
    """Write the DALI index file of the plain tar ``shard`` to ``index_path``."""
    text = dali_index_text(shard).encode("ascii")
    index_path = Path(index_path)
    write_atomically(index_path, lambda handle: handle.write(text))
    return index_path


def cache_name(path: Path) -> str:
    """A cache file stem that changes when the source file is replaced or modified."""
    status = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}|{status.st_size}|{status.st_mtime_ns}".encode()).hexdigest()
    stem = path.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{stem}-{digest[:12]}"


def decompress_shard(shard: Path, output_path: Path) -> Path:
    """Decompress a gzip-compressed tar to ``output_path`` (atomically)."""
    def copy(handle) -> None:
        with gzip.open(shard, "rb") as source:
            shutil.copyfileobj(source, handle, length=1 << 20)

    try:
        write_atomically(output_path, copy)
    except (OSError, EOFError) as error:
        raise DataError(f"cannot decompress shard {shard}: {error}") from None
    return output_path


def prepare_for_dali(shards: list[Path], cache_dir: str | Path,
                     index_dir: Optional[str | Path] = None) -> tuple[list[Path], list[Path]]:
    """Return plain tars and their DALI index files for ``shards``, creating what is missing.

    Compressed shards are decompressed into ``cache_dir``. Index files go to ``index_dir``
    (default ``cache_dir``), never beside the user's shards unless ``index_dir`` says so.
    Files already in the cache are reused while their source is unchanged.
    """
    cache_dir = Path(cache_dir)
    index_dir = Path(index_dir) if index_dir is not None else cache_dir
    tars, indexes = [], []
    for shard in shards:
        shard = Path(shard)
        name = cache_name(shard)
        if is_compressed(shard):
            plain = cache_dir / f"{name}.tar"
            if not plain.exists():
                decompress_shard(shard, plain)
        else:
            plain = shard
        index_path = index_dir / f"{name}.idx"
        beside = shard.with_name(f"{shard.name}.idx")
        if plain == shard and beside.is_file() and beside.stat().st_mtime_ns >= shard.stat().st_mtime_ns:
            # An index that ``lookaround-shards index`` wrote beside the shard, newer than it.
            index_path = beside
        elif not index_path.exists():
            write_dali_index(plain, index_path)
        tars.append(plain)
        indexes.append(index_path)
    return tars, indexes


# ---------------------------------------------------------------------------------------
# Verification


@dataclasses.dataclass
class Problem:
    shard: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.shard}: key {self.key}: {self.message}"


@dataclasses.dataclass
class ShardReport:
    shard: str
    samples: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)


def verify_shard(path: str | Path, num_classes: Optional[int] = None) -> ShardReport:
    """Check every sample of one shard: image present and decodable, label present and valid."""
    path = Path(path)
    report = ShardReport(str(path))
    components: dict[str, dict[str, bytes]] = {}
    try:
        mode = "r:gz" if is_compressed(path) else "r:"
        with tarfile.open(path, mode=mode) as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = split_member_name(member.name)
                components.setdefault(key, {})[extension.lower()] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        report.problems.append(Problem(str(path), "-", f"cannot read the tar: {error}"))
        return report

    for key, parts in components.items():
        report.samples += 1
        problem = _check_sample(parts, num_classes)
        if problem:
            report.problems.append(Problem(str(path), key, problem))
    return report


def _check_sample(parts: dict[str, bytes], num_classes: Optional[int]) -> Optional[str]:
    images = [extension for extension in IMAGE_COMPONENTS if extension in parts]
    if not images:
        return f"missing image component (.jpg); found {', '.join(sorted(parts)) or 'nothing'}"
    if "cls" not in parts:
        return "missing label component (.cls)"
    text = parts["cls"].decode("ascii", "replace").strip()
    if not text.isdigit():
        return f"label {text[:20]!r} is not an ASCII decimal class index"
    label = int(text)
    if num_classes is not None and not 0 <= label < num_classes:
        return f"label {label} out of range for {num_classes} classes (0..{num_classes - 1})"
    try:
        decode_rgb(parts[images[0]])
    except (OSError, ValueError) as error:
        return f".{images[0]} does not decode: {str(error).splitlines()[0]}"
    return None
