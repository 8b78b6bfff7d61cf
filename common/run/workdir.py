"""`Workdir`: a run's workdir, opened once per program and passed down.

It owns the workdir's storage (a local folder or a bucket prefix, `common.storage`) and knows what
its files mean: the state file and its checkpoints, the best checkpoint, leases and pins. Code
above it asks it, and never asks whether the workdir is a bucket.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import State
from common.layout import BEST_LINK, EVAL_DIR
from common.run.protocol import BestEntry
from common.storage import Storage, open_storage
from common.storage.paths import Location


class Workdir:
    """One workdir and its storage; `str()` and `os.fspath()` give it as the user named it."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.location: Location = storage.location()

    @classmethod
    def open(cls, location: str | os.PathLike[str]) -> Workdir:
        """Open the workdir at `location` (a local folder, `s3://` or `gs://`): the program's one `open_storage`.

        Raises:
          UsageError: another `scheme://` URL, or a bucket that does not exist (exit 2).
        """
        return cls(open_storage(location))

    def __str__(self) -> str:
        return str(self.location)

    def __fspath__(self) -> str:
        return os.fspath(self.location)

    def __repr__(self) -> str:
        return f"Workdir({str(self.location)!r})"

    def __truediv__(self, key: str) -> Location:
        return self.storage.location(key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Workdir) and other.location == self.location

    def __hash__(self) -> int:
        return hash(self.location)

    @property
    def name(self) -> str:
        return self.location.name

    def describe(self, key: str) -> str:
        """Where `key` lies, for messages (a local path, or a URL)."""
        return self.storage.describe(key)

    # --- the state file and its checkpoints ------------------------------------------------------

    def state(self) -> State | None:
        """What the state file says; None when there is none. Raises CheckpointError for a broken one."""
        return checkpoints.read_state(self.storage)

    def write_state(self, state: State) -> None:
        checkpoints.write_state(self.storage, state)

    def steps_on_disk(self) -> list[int]:
        """Steps of the `model-<step>` checkpoints whose index file exists, ascending."""
        return checkpoints.on_disk(self.storage)

    def key_of(self, path: str) -> str | None:
        """The key of a path the state file names, or None when it points outside (see `Storage.key_of`)."""
        return self.storage.key_of(path)

    def inside(self, path: str) -> bool:
        """Whether state-file path `path` names a checkpoint directly in the workdir."""
        return checkpoints.inside(self.storage, path)

    def resolve(self, path: str) -> Location:
        """Where state-file path `path` points: a prefix in the workdir, or the path as written."""
        return checkpoints.resolve(self.storage, path)

    def fingerprint(self, name: str) -> str | None:
        """`<size>:<crc32>` of checkpoint `name`'s `.index` (see `checkpoints.index_fingerprint`)."""
        return checkpoints.index_fingerprint(self.storage, name)

    def has_checkpoint(self, name: str) -> bool:
        """Whether checkpoint `name`'s `.index` file (or object) exists."""
        return self.storage.stat(f"{name}.index") is not None

    def check_readable(self, name: str) -> str | None:
        """Why checkpoint `name` cannot be read, or None (reads it whole; see `checkpoints.check_readable`)."""
        return checkpoints.check_readable(self.storage, name)

    def announce(self, note: str) -> None:
        """Commit the state file again so that a watcher that polls it alone notices (see `checkpoints.announce`)."""
        checkpoints.announce(self.storage, note)

    # --- reading checkpoints ---------------------------------------------------------------------

    def readable(self, name: str) -> contextlib.AbstractContextManager[Path]:
        """A local prefix TF reads checkpoint `name` from while the block runs (see `Storage.readable`)."""
        return self.storage.readable(name)

    def pin(self, name: str) -> contextlib.AbstractContextManager[Path]:
        """A private local copy of checkpoint `name`, removed on exit (see `Storage.pin`). Raises Gone."""
        return self.storage.pin(name)

    # --- the best checkpoint ---------------------------------------------------------------------

    def best(self) -> BestEntry | None:
        """The evaluator's best checkpoint (eval/best.json), or None."""
        return BestEntry.read(self.storage)

    def best_key(self) -> str | None:
        """The key of the best checkpoint's files (`eval/best/<name>`, through its pointer), or None."""
        entry = self.best()
        folder = self.storage.through(f"{EVAL_DIR}/{BEST_LINK}") if entry is not None else None
        return None if entry is None or folder is None else f"{folder}/{entry.checkpoint}"

    def local_folder(self) -> Path | None:
        """The workdir as a local folder, or None in a bucket (see `Storage.local_folder`)."""
        return self.storage.local_folder()
