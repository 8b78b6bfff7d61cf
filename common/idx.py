"""Reader (and writer, for tests and tools) of the IDX format that MNIST-family datasets ship in.

Format: 2 zero bytes, a type byte (0x08 = unsigned byte), a dimension count, one big-endian
uint32 per dimension, then the data in row-major order. Files may be gzipped.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from common.errors import DataFormatError

_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def _read_raw(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head != _GZIP_MAGIC:
            return f.read()
        try:
            with gzip.open(f) as g:
                return g.read()
        except (OSError, EOFError) as e:
            raise DataFormatError(f"{path}: damaged gzip data ({e})") from e


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
    raw = _read_raw(path)
    if len(raw) < 4:
        raise DataFormatError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    magic = int.from_bytes(raw[:4], "big")
    if zero != 0 or dtype != _UBYTE:
        raise DataFormatError(f"{path}: bad magic number 0x{magic:08x} (expected 0x{0x800 | ndim:08x})")
    if dims != ndim:
        raise DataFormatError(f"{path}: {dims} dimensions (expected {ndim})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataFormatError(
            f"{path}: {what}: {len(raw)} bytes, expected {expected} for shape {tuple(shape)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array as IDX; gzipped when the name ends in `.gz`."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, _UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
