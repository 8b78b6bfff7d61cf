"""The storage seam's interface: the `Storage` protocol and the types every implementation shares.

Implementations (`common/storage/local.py`, `common/storage/objectstore.py`) import this module, and
`common/storage/__init__.py` re-exports it with the factory `open_storage`, so that no module of the seam
imports another in a circle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import NamedTuple, Protocol

from common.layout import META_SUFFIX
from common.storage.paths import Location


class Stat(NamedTuple):
    """What a reader needs to know of an object without reading it (a tuple: made on every poll, cheaply)."""

    size: int  # bytes
    mtime: float  # when it was last written, in seconds since the epoch
    token: str  # changes whenever the content may have changed (local: inode and mtime_ns; a store's generation/ETag)
    origin: str  # changes when the object is replaced as a whole, not when appended to (local: device and inode)


class Gone(Exception):
    """The checkpoint was deleted (or replaced) before it could be read."""


class Locked(Exception):
    """Another process holds the lock; the message is what the holder wrote into it."""


class Storage(Protocol):
    """The operations on one workdir.

    Every key is relative to the root; `..` and absolute keys are refused. `append`, `lock` and
    `lease` create the folders they need; `write` expects the key's folder (a local folder) to exist.
    """

    root: str  # the workdir as the user named it, for messages
    # How a watcher learns of changes. True for an object store: it polls the state file alone (one request
    # per poll), so a writer commits the state file again to announce its other files (done.json), and a
    # reader rescans only after a notice. False for a local folder: every watched name is seen, and since
    # inotify can lose events a reader also rescans on a timer.
    polls_state_file_only: bool
    default_poll_secs: float  # how often a watcher polls when the user does not say (each poll costs requests)
    held: str  # where its files are, as a message says it: "on disk", "in the bucket"

    def describe(self, key: str) -> str:
        """Where `key` lies, for messages (a local path, or a URL)."""
        ...

    def location(self, key: str = "") -> Location:
        """The workdir, or `key` in it, as a path-like: a local `Path`, or a bucket's `BucketPath` URL."""
        ...

    def key_of(self, path: str) -> str | None:
        """The key of a path a state file names (relative to the root, or absolute inside it), or None outside.

        A local folder also takes an absolute path into the root by another spelling (a symlink) and,
        for a moved workdir, one that names no checkpoint where it points while the root holds its file name.
        """
        ...

    def local_folder(self) -> Path | None:
        """The root as a local folder, for what only one can hold (TensorBoard logs, SavedModels); None in a bucket."""
        ...

    def exists(self) -> bool:
        """Whether the root is there to read (a local folder exists; a bucket prefix always is)."""
        ...

    def create(self) -> None:
        """Make the root exist (a local folder and its parents; nothing for a bucket prefix)."""
        ...

    def why_unwritable(self) -> str | None:
        """Why the root cannot be created or written, or None when it can (checked before any write)."""
        ...

    def write(self, key: str, data: bytes) -> None:
        """Replace `key` atomically: readers see the old content or the new, never a part. Raises OSError."""
        ...

    def read(self, key: str, *, limit: int | None = None) -> bytes | None:
        """The content of `key` (at most `limit` bytes), or None when it does not exist. Raises OSError."""
        ...

    def read_from(self, key: str, offset: int) -> tuple[Stat, bytes] | None:
        """The object's Stat and its bytes from `offset` on, read together; None when it does not exist."""
        ...

    def append(self, key: str, data: bytes) -> None:
        """Add `data` durably at the end of `key` (created if absent); on failure `key` keeps its old content."""
        ...

    def names(self, folder: str = "", pattern: str = "*") -> list[str]:
        """Names (not keys) of the entries directly in `folder` that match the glob `pattern`, sorted."""
        ...

    def stat(self, key: str) -> Stat | None:
        """The Stat of `key`, or None when it does not exist."""
        ...

    def delete(self, key: str) -> None:
        """Delete `key` (a folder with everything in it); a missing key is fine.

        Raises:
          OutsideError: the key resolves outside the root (a link pointing out); nothing is deleted.
        """
        ...

    def checkpoint_files(self, name: str) -> list[str]:
        """Keys of the files of checkpoint `name` (its `.index` and `.data-*` shards), sorted."""
        ...

    def checkpoint_target(self, name: str) -> str:
        """The local prefix TensorFlow writes checkpoint `name` to (the workdir itself, or a staging folder)."""
        ...

    def commit_checkpoint(self, name: str, *, state_key: str, state: bytes) -> None:
        """Make the files TF wrote at `checkpoint_target(name)` durable under their keys, then write the state file.

        Writing the state file is the commit point: it happens only once every file is complete
        (local: fsynced in place; an object store: uploaded and verified). Raises OSError.
        """
        ...

    def readable(self, name: str) -> contextlib.AbstractContextManager[Path]:
        """A local prefix TensorFlow can read checkpoint `name` from while the block runs.

        A local folder's files in place (no copy: for a reader that restores at once); a bucket's
        pinned download. Raises Gone as `pin` does.
        """
        ...

    def pin(self, name: str) -> contextlib.AbstractContextManager[Path]:
        """A private local copy of checkpoint `name` for reading; yields its prefix, removed on exit.

        Raises:
          Gone: its files disappeared or changed while being copied.
        """
        ...

    def lock(self, key: str, *, wait: bool, note: str = "",
             discard: bool = False) -> contextlib.AbstractContextManager[None]:
        """Hold an exclusive lock named `key` (writing `note` into it) while the block runs.

        Released when the holder exits in any way (local: the kernel drops the flock; an object
        store: a lock object that expires unless renewed). Raises Locked when not `wait`ing and taken.
        `discard`: remove `key` on release (an object store's lock object always goes), for locks
        taken once per item (the evaluators' claims) that must not pile up.
        """
        ...

    def lease(self, name: str, *, ttl: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold a lease on checkpoint `name` (see `leased`) while the block runs. Raises OSError.

        `ttl`: an object store's time to live (renewed every third of it) instead of its default; a
        local lease lives as long as its process.
        """
        ...

    def leased(self) -> set[str]:
        """Checkpoints a live reader holds a lease on. A lease whose holder died (or whose time ran out) is ignored."""
        ...

    def clean_readers(self) -> list[str]:
        """Delete what readers that died left (leases, pinned copies); return why any was kept."""
        ...

    def clean_leftovers(self) -> list[str]:
        """Delete what an interrupted write or commit left at the root; return the names removed."""
        ...

    def watch(self, names: Collection[str], on_change: Callable[[], None], *, on_lost: Callable[[], None],
              poll: bool, poll_secs: float) -> contextlib.AbstractContextManager[None]:
        """Call `on_change` whenever a root entry in `names` may have changed, while the block runs.

        `on_lost` is called when changes may have been missed (an overflowed event queue), so the
        caller rescans. Local: inotify, or polling with `poll`; an object store polls metadata.
        """
        ...

    def point(self, key: str, target: str) -> None:
        """Make `key` a pointer to the folder `target` (a name in the same folder), atomically."""
        ...

    def pointer(self, key: str) -> str | None:
        """The target `key` points to, or None when it is not a pointer."""
        ...

    def is_folder(self, key: str) -> bool:
        """Whether `key` is a folder or a link (locally: not a plain file); a bucket has no such kinds: always True."""
        ...

    def through(self, key: str) -> str | None:
        """The key under which folder `key` is read, a pointer followed: `key` itself where the filesystem
        follows links (a local folder), the target's key in a bucket, None there when it is no pointer."""
        ...

    def publish(self, folder: Path, key: str, *, last: str) -> None:
        """Put the files of local `folder` under `key/`, replacing what is there; a reader never sees a mix.

        Local: the folder is copied beside `key` and renamed over it. An object store writes each
        file, `last` after every other one (and deletes an old `last` first), so a reader that finds
        `last` finds the complete set beside it. Raises OSError.
        """
        ...

    def adopt(self, folder: Path, key: str) -> None:
        """Move the private local folder `folder` (from `pin`) into the workdir as `key`. Raises OSError."""
        ...


def require_complete(name: str, keys: list[str]) -> None:
    """Raise Gone unless `keys` hold checkpoint `name`'s index and every data shard its shard names count.

    Retention deletes a checkpoint's data shards before its index, so a listing made meanwhile shows
    the index beside some of the shards: a copy made from it would be incomplete.
    """
    base = name.rpartition("/")[2]
    if not any(k.endswith(f"{base}.index") for k in keys):
        raise Gone(f"{base}.index is gone")
    shards = [k.rpartition("/")[2] for k in keys if ".data-" in k.rpartition("/")[2]]
    if not shards:  # TF writes at least one
        raise Gone(f"{base}.data-00000-of-* was deleted while being read")
    counts = {s.rpartition("-of-")[2] for s in shards}
    for count in counts:
        if count.isdigit():
            expected = {f"{base}.data-{i:05d}-of-{count}" for i in range(int(count))}
            for missing in sorted(expected - set(shards)):
                raise Gone(f"{missing} was deleted while being read")


def checkpoint_keys(storage: Storage, name: str) -> list[str]:
    """Keys of the files of checkpoint `name` in `storage`: its `.index`, `.data-*` shards and a Saver's `.meta`."""
    folder, _, base = name.rpartition("/")
    names = storage.names(folder, base + ".*")
    keep = [n for n in names if n in (base + ".index", base + META_SUFFIX) or n.startswith(base + ".data-")]
    return [f"{folder}/{n}" if folder else n for n in keep]
