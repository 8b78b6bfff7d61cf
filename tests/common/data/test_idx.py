from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from common.data.idx import read_idx, write_idx
from common.errors import DataFormatError


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_roundtrip_raw_and_gzip(tmp_path: Path, name: str) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28).astype(np.uint8)
    write_idx(tmp_path / name, images)
    back = read_idx(tmp_path / name, ndim=3)
    assert back.shape == (3, 28, 28)
    np.testing.assert_array_equal(back, images)


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    labels = np.array([1, 2, 3], dtype=np.uint8)
    write_idx(tmp_path / "l.gz", labels)
    (tmp_path / "l.gz").rename(tmp_path / "labels-idx1-ubyte")
    np.testing.assert_array_equal(read_idx(tmp_path / "labels-idx1-ubyte", ndim=1), labels)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_magic_names_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad", b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x01" + b"\x05")
    with pytest.raises(DataFormatError, match=r"bad.*bad magic number 0x00000d01"):
        read_idx(path, ndim=1)


def test_wrong_dimension_count(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    write_idx(path, np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataFormatError, match=r"1 dimensions \(expected 3\)"):
        read_idx(path, ndim=3)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "images"
    write_idx(path, np.zeros((2, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match=r"images: truncated: 1574 bytes, expected 1584"):
        read_idx(path, ndim=3)


def test_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    write_idx(path, np.zeros(4, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"xx")
    with pytest.raises(DataFormatError, match=r"trailing bytes"):
        read_idx(path, ndim=1)


def test_damaged_gzip(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02ab")[:-6])
    with pytest.raises(DataFormatError, match=r"labels.gz: damaged gzip data"):
        read_idx(path, ndim=1)


def test_too_short(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"too short"):
        read_idx(_write(tmp_path / "e", b"\x00"), ndim=1)
