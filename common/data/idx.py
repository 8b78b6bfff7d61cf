"""Reader (and writer, for tests and tools) of the IDX format that MNIST-family datasets ship in.

Format: 2 zero bytes, a type byte (0x08 = unsigned byte), a dimension count, one big-endian
uint32 per dimension, then the data in row-major order. Files may be gzipped.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataFormatError

_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


MAX_BYTES = 1 << 31  # no MNIST-family file comes near this; larger claims are refused before reading


def _read_checked(path: Path, ndim: int) -> tuple[tuple[int, ...], bytes]:
    """Read the header, then exactly the data it announces (never more, so a gzip bomb cannot expand)."""
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        try:
            with gzip.open(raw) if gzipped else open(path, "rb") as f:
                return _read_stream(path, f, ndim)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataFormatError(f"{path}: damaged gzip data ({e})") from e


def _read_stream(path: Path, f: Any, ndim: int) -> tuple[tuple[int, ...], bytes]:
    head = f.read(4)
    if len(head) < 4:
        raise DataFormatError(f"{path}: too short to be an IDX file ({len(head)} bytes)")
    zero, dtype, dims = struct.unpack(">HBB", head)
    if zero != 0 or dtype != _UBYTE:
        raise DataFormatError(f"{path}: bad magic number 0x{int.from_bytes(head, 'big'):08x} "
                              f"(expected 0x{0x800 | ndim:08x})")
    if dims != ndim:
        raise DataFormatError(f"{path}: {dims} dimensions (expected {ndim})")
    dim_bytes = f.read(4 * ndim)
    if len(dim_bytes) < 4 * ndim:
        raise DataFormatError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", dim_bytes)
    size = math.prod(shape)
    header = 4 + 4 * ndim
    if size > MAX_BYTES:
        raise DataFormatError(f"{path}: header claims shape {tuple(shape)} ({size} bytes), more than any "
                              "MNIST-family file; refusing to read it")
    data = f.read(size)
    extra = f.read(1)
    if len(data) < size:
        raise DataFormatError(f"{path}: truncated: {header + len(data)} bytes, expected {header + size} "
                              f"for shape {tuple(shape)}")
    if extra:  # not read further: the rest could be a gzip bomb
        raise DataFormatError(f"{path}: has trailing bytes after the {header + size} that shape {tuple(shape)} needs")
    return shape, data


def read_idx(path: str | os.PathLike[str], *, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with `ndim` dimensions.

    Args:
      path: the file, raw or gzipped.
      ndim: the number of dimensions expected (3 for images, 1 for labels).

    Returns:
      A uint8 array of the file's shape.

    Raises:
      DataFormatError: the file is not IDX, has another type or dimension count, or is truncated
        or too long; the message names the file and what is wrong.
    """
    path = Path(path)
    shape, data = _read_checked(path, ndim)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array as IDX; gzipped when the name ends in `.gz`."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, _UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
