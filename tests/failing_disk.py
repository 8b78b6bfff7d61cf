"""A local folder that fails as a full or a read-only disk does, without a mount and without root.

`FailingDisk` stands in for the `os` calls and `open` that Python code makes on paths inside one
folder: `LocalStorage`, its file helpers and everything else in this process that writes there.
What TensorFlow writes in C++ (checkpoint files, TensorBoard logs) still lands; a size-limited
tmpfs (tests/fault/test_faults.py, tests/evaluator/test_failures.py) is what fails that too.

    disk = FailingDisk(workdir, monkeypatch)
    disk.fail(errno.ENOSPC)  # from now on the disk is full
    ...
    disk.heal()  # room again
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# What a full disk still does: take no new data, but delete, rename and link (no data blocks needed).
# A read-only disk (EROFS), or a folder this user may not write (EACCES), refuses every change.
FULL = errno.ENOSPC
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC


class FailingDisk:
    """The folder `root` as a disk that refuses writes with an errno once `fail` is called, until `heal`."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = os.path.realpath(root)
        self.error: int | None = None  # the errno of every refused call; None: the disk works
        self.only = "*"  # refuse only for paths (relative to root) that match this glob
        self.room = 0  # bytes a full disk still takes before it refuses
        self.when: Callable[[], bool] = lambda: True  # refuse only while this holds (a disk that fills later)
        self.refused: list[str] = []  # "<call> <path relative to root>" of each refusal: the fault was met
        self._real = {name: getattr(os, name) for name in ("open", "write", "mkdir", "link", "symlink", "rename",
                                                           "replace", "unlink", "remove", "rmdir")}
        self._real_open = builtins.open
        monkeypatch.setattr(builtins, "open", self._open)
        monkeypatch.setattr(io, "open", self._open)  # pathlib's `Path.open` calls io.open
        monkeypatch.setattr(os, "open", self._os_open)
        monkeypatch.setattr(os, "write", self._write)
        monkeypatch.setattr(os, "mkdir", self._mkdir)
        for name in ("link", "symlink", "rename", "replace"):
            monkeypatch.setattr(os, name, self._two_paths(name))
        for name in ("unlink", "remove", "rmdir"):
            monkeypatch.setattr(os, name, self._one_path(name))

    def fail(self, error: int, *, only: str = "*", room: int = 0, when: Callable[[], bool] = lambda: True) -> None:
        """Refuse with `error` from now on: what matches `only`, while `when()` holds (full: past `room` bytes)."""
        self.error, self.only, self.room, self.when = error, only, room, when

    def heal(self) -> None:
        """Make the disk work again."""
        self.error = None

    def _applies(self, path: Any, dir_fd: int | None = None, *, full_too: bool = True) -> str | None:
        """The key of `path` when a call on it fails now (a full disk fails only when `full_too`), else None."""
        if self.error is None or (self.error == FULL and not full_too):
            return None
        key = _key(self.root, path, dir_fd)
        return key if key is not None and fnmatch.fnmatchcase(key, self.only) and self.when() else None

    def refuse(self, call: str, key: str, path: Any) -> OSError:
        """The error for `call` on `path`, recorded in `refused`."""
        assert self.error is not None
        self.refused.append(f"{call} {key}")
        return OSError(self.error, os.strerror(self.error), os.fsdecode(path))

    def take(self, size: int) -> int:
        """How many of `size` bytes a full disk still takes."""
        fits = min(size, self.room)
        self.room -= fits
        return fits

    def _open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        key = None if isinstance(file, int) or not any(c in mode for c in "wax+") else self._applies(file)
        if key is None:
            return self._real_open(file, mode, *args, **kwargs)
        if self.error == FULL:  # the file is created; its data does not fit
            return _FullFile(self._real_open(file, mode, *args, **kwargs), self, key, file)
        raise self.refuse("open", key, file)

    def _os_open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        creates = flags & os.O_CREAT and not os.path.lexists(_where(path, dir_fd))
        key = self._applies(path, dir_fd, full_too=False) if flags & _WRITE_FLAGS or creates else None
        if key is not None:
            raise self.refuse("open", key, path)
        return self._real["open"](path, flags, mode, dir_fd=dir_fd)

    def _write(self, fd: int, data: Any) -> int:
        key = None if self.error is None else self._applies(_fd_path(fd))
        if key is None:
            return self._real["write"](fd, data)
        fits = self.take(len(data)) if self.error == FULL else 0
        if not fits:
            raise self.refuse("write", key, _fd_path(fd))
        return self._real["write"](fd, memoryview(data)[:fits])  # a short write, as the kernel makes it

    def _mkdir(self, path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        key = None if os.path.lexists(_where(path, dir_fd)) else self._applies(path, dir_fd)
        if key is not None:  # a new folder needs a block of its own, even on a full disk
            raise self.refuse("mkdir", key, path)
        self._real["mkdir"](path, mode, dir_fd=dir_fd)

    def _two_paths(self, name: str) -> Callable[..., Any]:
        real = self._real[name]
        checked = (1,) if name == "symlink" else (0, 1)  # a symlink's source is only the text it holds

        def call(*args: Any, **kwargs: Any) -> Any:
            # Names are looked up first: a missing source, or a link name in use, fails as on any disk.
            looked_up = not os.path.lexists(args[1]) if name == "symlink" else os.path.lexists(args[0])
            for i in checked if looked_up else ():
                key = self._applies(args[i], full_too=False)
                if key is not None:
                    raise self.refuse(name, key, args[i])
            return real(*args, **kwargs)

        return call

    def _one_path(self, name: str) -> Callable[..., Any]:
        real = self._real[name]

        def call(path: Any, *, dir_fd: int | None = None) -> Any:
            key = self._applies(path, dir_fd, full_too=False) if os.path.lexists(_where(path, dir_fd)) else None
            if key is not None:  # (a missing path fails as on any disk)
                raise self.refuse(name, key, path)
            return real(path, dir_fd=dir_fd)

        return call


def _where(path: Any, dir_fd: int | None) -> str:
    """`path` as a string, joined to the folder of `dir_fd` when it is relative to one."""
    text = os.fsdecode(path)
    return os.path.join(_fd_path(dir_fd), text) if dir_fd is not None and not os.path.isabs(text) else text


def _key(root: str, path: Any, dir_fd: int | None) -> str | None:
    """`path` relative to `root` (a real path), or None when it lies elsewhere or is no path."""
    try:
        full = os.path.abspath(_where(path, dir_fd))
    except (TypeError, ValueError):
        return None
    full = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
    if full == root:
        return "."
    return full[len(root) + 1:] if full.startswith(root + os.sep) else None


def _fd_path(fd: int) -> str:
    """The path file descriptor `fd` is open on ("" when there is none)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class _FullFile:
    """A file opened on a full disk: what fits in the disk's `room` is written, then ENOSPC."""

    def __init__(self, file: Any, disk: FailingDisk, key: str, path: Any) -> None:
        self._file, self._disk, self._key, self._path = file, disk, key, path

    def write(self, data: Any) -> int:
        fits = self._disk.take(len(data))
        if fits < len(data):
            self._file.write(data[:fits])
            self._file.flush()
            raise self._disk.refuse("write", self._key, self._path)
        return int(self._file.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
