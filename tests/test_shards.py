"""The shard tool: packing an ImageFolder tree, DALI index files and the verifier."""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookaround_dist import shards
from lookaround_dist.cli.shards import main
from lookaround_dist.data.sources import open_index

CLASSES = ["bird", "cat", "dog"]


def jpeg_bytes(value: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes of four images each."""
    root = tmp_path / "tree"
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for number in range(4):
            (root / name / f"img{number}.jpg").write_bytes(jpeg_bytes(number * 40))
    return root


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_pack_round_trip(image_folder, tmp_path):
    out = tmp_path / "shards"
    assert main(["pack", str(image_folder), str(out), "--samples-per-shard", "5", "--seed", "3"]) == 0
    written = sorted(out.glob("*.tar"))
    assert [p.name for p in written] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]

    index = open_index(",".join(map(str, written)), num_classes=3)
    pairs = sorted((sample.key, sample.label) for sample in index.samples)
    expected = sorted((f"{name}_img{n}", label) for label, name in enumerate(CLASSES) for n in range(4))
    assert pairs == expected
    # Shuffled when written: the first shard is not just the first class.
    assert {sample.label for sample in index.samples[:5]} != {0}


def test_pack_round_trip_through_dali(image_folder, tmp_path):
    pytest.importorskip("nvidia.dali")
    from lookaround_dist.data.dali_backend import DaliEvalData

    written = shards.pack_image_folder(image_folder, tmp_path / "shards", samples_per_shard=5)
    path = ",".join(map(str, written))
    index = open_index(path, num_classes=3)
    data = DaliEvalData(path=path, index=index, rank=0, world_size=1, image_size=16, batch_size=4,
                        num_threads=1, mean=[0.5] * 3, std=[0.5] * 3, cache_dir=tmp_path / "cache")
    pairs = []
    for _, labels in data:
        pairs += zip(data.last_keys, labels.tolist())
    expected = sorted((f"{name}_img{n}", label) for label, name in enumerate(CLASSES) for n in range(4))
    assert sorted(pairs) == expected


def test_pack_never_overwrites(image_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "shard-000001.tar").write_bytes(b"keep me")
    assert main(["pack", str(image_folder), str(out), "--samples-per-shard", "5"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert (out / "shard-000001.tar").read_bytes() == b"keep me"
    assert not (out / "shard-000000.tar").exists()


def test_index_file_format(tmp_path):
    shard = write_tar(tmp_path / "a.tar", {"x1.jpg": jpeg_bytes(1), "x1.cls": b"2",
                                           "x2.jpg": jpeg_bytes(2), "x2.cls": b"0"})
    assert main(["index", str(shard), "--output-dir", str(tmp_path / "idx")]) == 0
    lines = (tmp_path / "idx" / "a.tar.idx").read_text().splitlines()
    assert lines[0] == "v1.2 2"
    assert len(lines) == 3
    with tarfile.open(shard) as archive:
        member = archive.getmember("x1.cls")
        assert lines[1].split()[4:] == ["cls", str(member.offset_data), "1", "x1.cls"]
    assert not (tmp_path / "a.tar.idx").exists()


def test_index_gzip_needs_decompress(tmp_path, capsys):
    plain = write_tar(tmp_path / "a.tar", {"x1.jpg": jpeg_bytes(1), "x1.cls": b"2"})
    compressed = tmp_path / "a.tar.gz"
    with open(plain, "rb") as source, gzip.open(compressed, "wb") as target:
        shutil.copyfileobj(source, target)

    assert main(["index", str(compressed)]) == 2
    assert "gzip-compressed" in capsys.readouterr().err

    out = tmp_path / "out"
    assert main(["index", str(compressed), "--decompress", "--output-dir", str(out)]) == 0
    assert (out / "a.tar").read_bytes() == plain.read_bytes()
    assert (out / "a.tar.idx").read_text().startswith("v1.2 1\n")


def test_verify_reports_each_problem(tmp_path, capsys):
    good = jpeg_bytes(100, size=32)
    shard = write_tar(tmp_path / "bad.tar", {
        "ok.jpg": good, "ok.cls": b"1",
        "truncated.jpg": good[: len(good) // 2], "truncated.cls": b"1",
        "nolabel.jpg": good,
        "toobig.jpg": good, "toobig.cls": b"10",
    })
    assert main(["verify", str(shard), "--num-classes", "10"]) == 1
    output = capsys.readouterr().out
    assert "4 samples, 3 problem(s)" in output
    assert f"{shard}: key truncated: .jpg does not decode" in output
    assert f"{shard}: key nolabel: missing label component (.cls)" in output
    assert f"{shard}: key toobig: label 10 out of range for 10 classes" in output
    assert "key ok:" not in output


def test_verify_clean_shard_passes(tmp_path, capsys):
    shard = write_tar(tmp_path / "a.tar", {"x1.jpg": jpeg_bytes(1), "x1.cls": b"2"})
    assert main(["verify", str(shard), "--num-classes", "3"]) == 0
    assert "total: 1 samples in 1 shard(s), 0 problem(s)" in capsys.readouterr().out
