"""A private, hard-linked snapshot of a checkpoint, so the trainer's retention can delete it mid-read.

Deleting a file only removes a name; the evaluator's hard links keep the data alive until it
has read them. A checkpoint whose files vanish (or are replaced) while being linked is `gone`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from common import checkpoints
from common.errors import WorkdirIOError
from common.paths import OutsideError, remove
from common.workdir import lease_path, write_lease


@contextlib.contextmanager
def lease(workdir: Path, checkpoint: str) -> Iterator[None]:
    """Tell the trainer's retention that this process is reading `checkpoint` (see common.workdir.leased).

    Raises:
      WorkdirIOError: the lease cannot be written (read-only workdir, full disk).
    """
    path = lease_path(workdir, checkpoint, os.getpid())
    try:
        write_lease(path)
    except OSError as e:
        with contextlib.suppress(OSError, OutsideError):
            remove(path, workdir)  # a half-written lease (full disk) would outlive this process
        raise WorkdirIOError(f"cannot write the lease {path}: {e.strerror or e}") from e
    try:
        yield
    finally:
        # A lease left behind is harmless: it names a dead pid, and the next start removes it.
        with contextlib.suppress(OSError, OutsideError):
            remove(path, workdir)


class Gone(Exception):
    """The checkpoint was deleted (or replaced) before it could be read."""


@contextlib.contextmanager
def snapshot(prefix: Path, scratch: Path) -> Iterator[Path]:
    """Yield the prefix of a hard-linked copy of checkpoint `prefix`, removed afterwards.

    Raises:
      Gone: the checkpoint's files disappeared or changed while they were being linked.
      OSError: the scratch folder cannot hold hard links to the workdir (another filesystem).
    """
    folder = scratch / f".snapshot-{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir(parents=True)
    try:
        files = checkpoints.files_of(prefix)
        if not any(f.name.endswith(".index") for f in files):
            raise Gone(f"{prefix.name}.index is gone")
        linked = []
        for file in files:
            try:
                os.link(file, folder / file.name)
            except FileNotFoundError:
                raise Gone(f"{file.name} was deleted while being read") from None
            linked.append(file)
        # The trainer replaces a checkpoint by deleting then rewriting it: a changed inode means
        # the links may mix two versions.
        for file in linked:
            try:
                same = os.stat(file).st_ino == os.stat(folder / file.name).st_ino
            except FileNotFoundError:
                same = True  # deleted after linking: our link holds the complete old version
            if not same:
                raise Gone(f"{file.name} was replaced while being read")
        yield folder / prefix.name
    finally:
        remove(folder, scratch)
