"""`ObjectStorage`: a workdir in an S3 or GCS bucket, with the crash-safety promise of a local one.

An object store has no rename, no hard links, no flock and no inotify. Each PUT of one object is
atomic, listings are strongly consistent (S3 and GCS alike), and a PUT can be made conditional on
the object being absent (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`). How each operation of
`common.storage.Storage` is made safe on top of that (docs/storage.md tells the whole story):
  - writes: one PUT, atomic by itself;
  - the trainer's commit: TF writes into a private local staging folder; each file is uploaded
    under its final key and verified (size, and the store's MD5); only then is the state file PUT
    (the commit point); the staged copy goes last;
  - appends (the ledger, `*.jsonl`): one object per append, `.<name>.parts/<n>`, created only if
    absent with the next number, so two evaluators never overwrite each other; reads join them in
    order and fold many into one object ("compacted on read"). Other keys are appended to by a
    read and a rewrite;
  - pins: each file downloaded into a private local folder, its size and token checked after; a
    file that vanished or changed meanwhile is `Gone`;
  - locks and leases: small JSON objects naming host, pid and an expiry time, renewed by a thread
    while held. A holder that stopped renewing is ignored once its time ran out; one on this host
    whose pid is dead is ignored at once (a pid is exact on its own machine). A take-over deletes
    the old object only if it is still the version judged expired;
  - change notices: a thread polls the metadata (ETag or generation) of the watched names, one
    small request per name per poll whatever the number of checkpoints;
  - pointers: a small object `ckpt-watch-pointer: <target>`, followed by `read`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import fnmatch
import functools
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from common.layout import EVAL_DIR, LEASE_DIR, STATE_FILE
from common.storage.api import Gone, Locked, Stat, checkpoint_keys, require_complete
from common.storage.bucket import CONCURRENCY, Bucket, BucketURL, Digest, mismatch, one_line
from common.storage.local import pid_alive
from common.storage.paths import BucketPath, is_bucket

POINTER_MAGIC = b"ckpt-watch-pointer: "
APPENDED = ".jsonl"  # keys with this suffix are appended to as one object per append
FOLDED = ".folded"  # .<name>.parts/<n>.folded: parts 1..n joined into one object by a reader
FOLD_AT = 32  # a reader folds the parts once there are this many (a read costs one GET per part)
LOCK_TTL_SECS = 30.0  # a lock or lease not renewed for this long is free (renewed every third of it)
LEASE_TTL_SECS = 60.0
LOCAL_PREFIX = "ckpt-watch-"  # <tmp>/ckpt-watch-{stage,pin}-<pid>-<id>/: this process's local copies
MAX_HOPS = 4  # pointers followed by one read
VERIFY_ATTEMPTS = 3  # downloads of one object whose copy does not match the store's checksum before a pin fails

log = logging.getLogger("ckpt_watch.bucket")


@functools.lru_cache(maxsize=16)
def open_bucket(workdir: str) -> ObjectStorage:
    """The storage of the bucket workdir `workdir`, once its bucket is known to exist (else UsageError).

    One per workdir and process: every module opens the workdir for each operation, and a client
    costs a connection pool and a listing of the bucket.
    """
    storage = ObjectStorage(workdir)
    storage.bucket.check_bucket()
    return storage


class ObjectStorage:
    """A workdir at `s3://bucket/prefix` or `gs://bucket/prefix` (see the module docstring)."""

    polls_state_file_only = True
    default_poll_secs = 2.0  # each poll is a request over the network
    held = "in the bucket"

    def __init__(self, workdir: str, *, bucket: Bucket | None = None, lock_ttl: float = LOCK_TTL_SECS,
                 lease_ttl: float = LEASE_TTL_SECS) -> None:
        self.root = workdir
        self.bucket = bucket if bucket is not None else Bucket(BucketURL.parse(workdir))
        self.url = self.bucket.url
        self.fs = self.bucket.fs
        self.lock_ttl = lock_ttl
        self.lease_ttl = lease_ttl
        self._staging: Path | None = None
        self._pinned: dict[Path, dict[str, tuple[str, str]]] = {}  # pinned folder -> file -> (its key, its token)
        self._parts: dict[tuple[str, str], bytes] = {}  # (appended part's key, its token) -> its bytes

    # --- objects ------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return self.url.path(check_key(key))

    def describe(self, key: str) -> str:
        return self.url.url(key)

    def location(self, key: str = "") -> BucketPath:
        return BucketPath(self.root) / key if key else BucketPath(self.root)

    def key_of(self, path: str) -> str | None:
        root = self.root.rstrip("/") + "/"
        name = path[len(root):] if path.startswith(root) else path
        return None if is_bucket(name) or name in ("", ".", "..") or "/" in name else name

    def local_folder(self) -> None:
        return None

    def exists(self) -> bool:
        return True

    def create(self) -> None:
        """A bucket prefix needs no folder."""

    def why_unwritable(self) -> None:
        return None  # the bucket was checked when it was opened (open_bucket)

    def write(self, key: str, data: bytes) -> None:
        self.bucket.call("writing", key, self.fs.pipe_file, self._path(key), data)
        if key.endswith(APPENDED):  # replaced as a whole: earlier appends belong to the old content
            self.delete(_parts_folder(key))

    def read(self, key: str, *, limit: int | None = None) -> bytes | None:
        for _ in range(MAX_HOPS):
            read = self._read_appended(key, 0) if key.endswith(APPENDED) else None
            # A ranged GET when `limit` is given (a garbage state file may be huge); enough for a pointer too.
            data = read[1] if read else self._get(key, end=None if limit is None else max(limit, 4096))
            if data is None:
                target = self._through_folder_pointer(key)
                if target is None:
                    return None
                key = target
            elif data.startswith(POINTER_MAGIC):
                key = _relative(key, data[len(POINTER_MAGIC):].decode("utf-8", "replace").strip())
            else:
                return data if limit is None else data[:limit]
        return None

    def _get(self, key: str, start: int | None = None, end: int | None = None) -> bytes | None:
        try:
            return self.bucket.call("reading", key, self.fs.cat_file, self._path(key), start=start, end=end)
        except (FileNotFoundError, IsADirectoryError):
            return None

    def _through_folder_pointer(self, key: str) -> str | None:
        """`key` with its folder replaced by the folder a pointer object there names, or None."""
        folder, _, name = key.rpartition("/")
        if not folder or not (target := self.pointer(folder)):
            return None
        return f"{_relative(folder, target)}/{name}"

    def read_from(self, key: str, offset: int) -> tuple[Stat, bytes] | None:
        if key.endswith(APPENDED):
            return self._read_appended(key, offset)
        for _ in range(3):  # the object may be replaced between the two requests: then read again
            stat = self.stat(key)
            if stat is None:
                return None
            data = self._get(key, start=offset) if offset < stat.size else b""
            if data is not None and len(data) == max(stat.size - offset, 0):
                return stat, data
        raise OSError(f"{self.describe(key)} kept changing while being read")

    def stat(self, key: str) -> Stat | None:
        if key.endswith(APPENDED):
            read = self._read_appended(key, 0)
            return None if read is None else read[0]
        return self._object_stat(key)

    def _object_stat(self, key: str) -> Stat | None:
        info = self.bucket.head(check_key(key))
        return None if info is None else _stat(info)

    def append(self, key: str, data: bytes) -> None:
        if not key.endswith(APPENDED):
            self.write(key, (self.read(key) or b"") + data)  # small files only (tests, markers): no log is kept
            return
        folder = _parts_folder(key)
        number = max((int(n.split(".")[0]) for n in self.names(folder, "[0-9]*", hidden=True)), default=0)
        while True:  # the next free number; another appender taking it first moves us one on
            number += 1
            try:
                self.bucket.call("appending to", key, self.fs.pipe_file, self._path(f"{folder}/{number:012d}"),
                                 data, mode="create")
                return
            except FileExistsError:
                continue

    def _read_appended(self, key: str, offset: int) -> tuple[Stat, bytes] | None:
        """The key's own object, then its appended parts in order; folded into one base object when many.

        A part deleted between the listing and its GET was folded into a newer base meanwhile: list again.
        """
        folder = _parts_folder(key)
        for _ in range(5):
            base = self._object_stat(key)
            listed = self._part_tokens(folder)
            names = sorted(listed)
            folded = max((n for n in names if n.endswith(FOLDED)), default=None)
            upto = int(folded.split(".")[0]) if folded else 0
            parts = [n for n in names if not n.endswith(FOLDED) and int(n) > upto]
            chunks = [self._part(f"{folder}/{n}", listed[n]) for n in ([folded] if folded else []) + parts]
            own = self._get(key) if base is not None else b""
            if own is None or any(c is None for c in chunks):
                continue
            if base is None and not names:
                return None
            data = own + b"".join(c for c in chunks if c is not None)
            if len(parts) >= FOLD_AT:
                self._fold(folder, names, data[len(own):], int(parts[-1]))
            origin = base.origin if base else "no-object"
            stat = Stat(size=len(data), mtime=base.mtime if base else 0.0, token=f"{origin}+{names[-1:]}",
                        origin=origin)
            return stat, data[offset:]
        raise OSError(f"{self.describe(key)} kept changing while being read")

    def _part_tokens(self, folder: str) -> dict[str, str]:
        """The appended parts in `folder` (and a folded base), each with its token: one listing."""
        return {name: _stat(info).token for name, info in self._listing(folder).items()
                if fnmatch.fnmatch(name, "[0-9]*")}

    def _listing(self, folder: str) -> dict[str, dict[str, Any]]:
        """The entries directly in `folder` (the workdir's root for ""), by name, with fsspec's details."""
        try:
            infos = self.bucket.call("listing", folder, self.fs.ls, self._path(folder) if folder else self.url.path(),
                                     detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {info["name"].rstrip("/").rpartition("/")[2]: info for info in infos}

    def _part(self, key: str, token: str) -> bytes | None:
        """An appended part's bytes: a part is created once and never rewritten, so each version is read once."""
        data = self._parts.get((key, token))
        if data is None:
            data = self._get(key)
            if data is not None:
                self._parts[(key, token)] = data
        return data

    def _fold(self, folder: str, names: list[str], data: bytes, upto: int) -> None:
        """Write parts 1..`upto` as one object `<upto>.folded`, then delete the objects it replaces."""
        try:
            self.bucket.call("folding", folder, self.fs.pipe_file, self._path(f"{folder}/{upto:012d}{FOLDED}"), data,
                             mode="create")
        except FileExistsError:
            return  # another reader folded the same parts
        for name in names:
            if int(name.split(".")[0]) <= upto:
                self._delete_object(f"{folder}/{name}")
        self._parts = {k: v for k, v in self._parts.items() if not k[0].startswith(f"{folder}/")}

    def names(self, folder: str = "", pattern: str = "*", *, hidden: bool = False) -> list[str]:
        names = set(self._listing(folder))
        if not hidden:  # `.<name>.parts/` holds the appends to <name>: it is that entry
            names = {n[1:-len(".parts")] if n.startswith(".") and n.endswith(".parts") else n for n in names}
        return sorted(fnmatch.filter(names, pattern))

    def delete(self, key: str) -> None:
        check_key(key, allow_root=False)
        if key.endswith(APPENDED):
            self.delete(_parts_folder(key))
        with contextlib.suppress(FileNotFoundError):
            self.bucket.call("deleting", key, self.fs.rm, self._path(key), recursive=True)

    def _delete_object(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.bucket.call("deleting", key, self.fs.rm_file, self._path(key))

    # --- checkpoints --------------------------------------------------------------------------

    def checkpoint_files(self, name: str) -> list[str]:
        return checkpoint_keys(self, name)

    def checkpoint_target(self, name: str) -> str:
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix=f"{LOCAL_PREFIX}stage-{os.getpid()}-"))
        return str(self._staging / check_key(name))

    def commit_checkpoint(self, name: str, *, state_key: str, state: bytes) -> None:
        """See `Storage.commit_checkpoint`: upload and verify the data files, `CONCURRENCY` at once, then the
        `.index`, then PUT the state file; the staged copy goes last.

        The index goes up last, so that an upload cut short (a kill) never leaves an index without its
        data: a checkpoint whose index is there is complete, and only the state file may be missing.
        """
        target = Path(self.checkpoint_target(name))
        files = sorted(target.parent.glob(f"{target.name}.*"))
        index = target.parent / f"{target.name}.index"
        if index not in files:
            raise OSError(f"no checkpoint was written at {target}")
        folder = name.rpartition("/")[0]
        keys = {file: check_key(f"{folder}/{file.name}" if folder else file.name) for file in files}
        data = [file for file in files if file != index]
        if data:
            with concurrent.futures.ThreadPoolExecutor(min(CONCURRENCY, len(data)), "upload") as pool:
                list(pool.map(lambda file: self.bucket.upload(keys[file], file), data))  # the first failure is raised
        self.bucket.upload(keys[index], index)
        self.write(state_key, state)
        for file in files:
            file.unlink()
        if self._staging is not None:
            with contextlib.suppress(OSError):  # empty unless another checkpoint is staged there
                self._staging.rmdir()
                self._staging = None

    def readable(self, name: str) -> contextlib.AbstractContextManager[Path]:
        """See `Storage.readable`: a pinned download."""
        return self.pin(name)

    @contextlib.contextmanager
    def pin(self, name: str) -> Iterator[Path]:
        """See `Storage.pin`: a download into `<tmp>/ckpt-watch-pin-<pid>-<id>/`, checked against the listing."""
        folder = Path(tempfile.mkdtemp(prefix=f"{LOCAL_PREFIX}pin-{os.getpid()}-"))
        try:
            self._pinned[folder] = self._download_checkpoint(name, folder)
            yield folder / name.rpartition("/")[2]
        finally:
            self._pinned.pop(folder, None)
            shutil.rmtree(folder, ignore_errors=True)

    def _download_checkpoint(self, name: str, folder: Path) -> dict[str, tuple[str, str]]:
        """Download checkpoint `name`'s files into `folder`, `CONCURRENCY` at once, each verified (see `_download`).

        Returns each file's key and token (for `adopt`).
        """
        keys = self.checkpoint_files(name)
        require_complete(name, keys)
        files = {key.rpartition("/")[2]: key for key in keys}
        with concurrent.futures.ThreadPoolExecutor(min(CONCURRENCY, len(keys)), "download") as pool:
            tokens = pool.map(lambda file: self._download(files[file], folder / file), files)
            return {file: (files[file], token) for file, token in zip(files, tokens, strict=True)}

    def _download(self, key: str, local: Path) -> str:
        """Download object `key` into `local` and check it against the store's size and MD5; return its token.

        A copy that does not match (a body cut short that the client did not notice, a part of a
        ranged download lost) is downloaded again, `VERIFY_ATTEMPTS` times in all: a pin never
        holds a half object. A file deleted before or during the download, or replaced meanwhile, is `Gone`.

        Raises:
          Gone: as above.
          OSError: every copy differed from the store's (errno EIO), or the store failed through every retry.
        """
        for attempt in range(1, VERIFY_ATTEMPTS + 1):
            before = self.bucket.head(key)
            try:
                if before is None:
                    raise FileNotFoundError(key)
                self.bucket.call("downloading", key, self.fs.get_file, self._path(key), str(local))
            except FileNotFoundError:
                raise Gone(f"{local.name} was deleted while being read") from None
            token = _stat(before).token
            after = self._object_stat(key)
            if after is not None and after.token != token:
                raise Gone(f"{local.name} was replaced while being read")
            # Deleted after the download (`after` None): our copy holds the complete old version, if it verifies.
            why = mismatch(before, Digest.of(local))
            if why is None:
                return token
            if attempt < VERIFY_ATTEMPTS:
                self.bucket.retries += 1
                log.warning("downloading %s: the copy does not verify (%s); downloading it again (attempt %d of %d)",
                            self.describe(key), why, attempt + 1, VERIFY_ATTEMPTS)
        raise OSError(errno.EIO, f"download of {self.describe(key)} did not verify {VERIFY_ATTEMPTS} times: {why}")

    def publish(self, folder: Path, key: str, *, last: str) -> None:
        old = self.names(key)
        files = sorted(p.name for p in folder.iterdir())
        if last in old:
            self.delete(f"{key}/{last}")
        for name in files:
            if name != last:
                self.write(f"{key}/{name}", (folder / name).read_bytes())
        for name in sorted(set(old) - set(files)):
            self.delete(f"{key}/{name}")
        if last in files:
            self.write(f"{key}/{last}", (folder / last).read_bytes())

    def adopt(self, folder: Path, key: str) -> None:
        """Put the private folder `folder` into the bucket as `key/`, each file verified; then remove the folder.

        A file pinned from an object that is still the same version is copied server-side (no upload
        of the checkpoint's shards); the others (the best.json and state file written locally) are uploaded.
        """
        sources = self._pinned.get(folder, {})
        for file in sorted(p for p in folder.iterdir() if p.is_file()):
            dest, source = f"{key}/{file.name}", sources.get(file.name)
            now = self._object_stat(source[0]) if source else None
            if source and now is not None and now.token == source[1]:
                self.bucket.call("copying", dest, self.fs.copy, self._path(source[0]), self._path(dest))
                try:
                    self.bucket.verify(dest, Digest.of(file))
                    continue
                except OSError:  # replaced between the check and the copy: put the bytes that were evaluated
                    log.warning("%s changed while being copied; uploading the evaluated copy", self.describe(dest))
            self.bucket.upload(check_key(dest), file)
        shutil.rmtree(folder, ignore_errors=True)

    def point(self, key: str, target: str) -> None:
        self.write(key, POINTER_MAGIC + target.encode("utf-8") + b"\n")

    def pointer(self, key: str) -> str | None:
        data = self._get(key) if not key.endswith(APPENDED) else None
        if data is None or not data.startswith(POINTER_MAGIC):
            return None
        return data[len(POINTER_MAGIC):].decode("utf-8", "replace").strip()

    def is_folder(self, key: str) -> bool:
        return True

    def through(self, key: str) -> str | None:
        target = self.pointer(key)
        return None if target is None else f"{key.rpartition('/')[0]}/{target}".lstrip("/")

    # --- locks, leases, cleaning --------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str, *, wait: bool, note: str = "", discard: bool = False) -> Iterator[None]:
        """See `Storage.lock`: an object created only if absent, renewed while held, deleted on release."""
        holder = Holder.mine(note, self.lock_ttl)
        while not self._create(key, holder):
            if wait:
                time.sleep(0.05 + secrets.randbelow(100) / 1000)  # jittered, so that waiters do not march in step
                continue
            current = Holder.parse(self._get(key))
            if current is None or current.expired():  # vanished meanwhile, or unreadable (a torn hand edit)
                continue
            raise Locked(current.note or f"process {current.pid} on {current.host}")
        with contextlib.ExitStack() as held:
            held.callback(self._release, key, holder)
            held.enter_context(Renewer(self, key, holder))  # stopped first, so that no renewal races the release
            yield

    def _release(self, key: str, holder: Holder) -> None:
        """Delete lock `key` if it is still ours (a holder that took it over after our time ran out keeps it).

        A release the store keeps failing (an outage, retried already) is a warning, never an error: it
        must not replace the error that may be ending the block, and the lock frees itself anyway, once
        its time runs out or as soon as another process of this host finds its pid dead.
        """
        try:
            version = self.bucket.head(key)
            current = Holder.parse(self._get(key))
            if version is not None and current is not None and current.owner == holder.owner:
                self.bucket.delete_if_unchanged(key, version)
        except OSError as e:
            log.warning("cannot release %s (%s); it frees itself when its time runs out, or at once for a "
                        "process of this host that finds this pid dead", self.describe(key), e.strerror or e)

    def _create(self, key: str, holder: Holder) -> bool:
        """Create `key` holding `holder` only if absent; take over a holder that is dead or out of time."""
        try:
            self.bucket.call("locking", key, self.fs.pipe_file, self._path(key), holder.encode(), mode="create")
            return True
        except FileExistsError:
            pass
        version = self.bucket.head(key)  # before the content: a delete conditional on it spares a newer holder
        current = Holder.parse(self._get(key))
        if version is None or (current is not None and not current.expired()):
            return False
        if current is not None:
            log.warning("taking over %s from %s (it %s)", self.describe(key), current.who(), current.why_free())
        self.bucket.delete_if_unchanged(key, version)  # a second taker's delete fails: it cannot remove ours
        return False

    @contextlib.contextmanager
    def lease(self, name: str, *, ttl: float | None = None) -> Iterator[None]:
        key = f"{EVAL_DIR}/{LEASE_DIR}/{name}@{os.getpid()}-{secrets.token_hex(3)}"
        holder = Holder.mine("", self.lease_ttl if ttl is None else ttl)
        self.write(key, holder.encode())
        try:
            with Renewer(self, key, holder):
                yield
        finally:
            with contextlib.suppress(OSError):
                self._delete_object(key)  # one left behind names a dead pid or runs out of time

    def leased(self) -> set[str]:
        return {name for name, holder in self._leases() if holder is not None and not holder.expired()}

    def _leases(self) -> list[tuple[str, Holder | None]]:
        folder = f"{EVAL_DIR}/{LEASE_DIR}"
        return [(n.rpartition("@")[0], Holder.parse(self._get(f"{folder}/{n}")), ) for n in self.names(folder, "*@*")]

    def clean_readers(self) -> list[str]:
        """See `Storage.clean_readers`: leases whose holder died or ran out of time, and dead local pins."""
        problems = []
        folder = f"{EVAL_DIR}/{LEASE_DIR}"
        for name in self.names(folder, "*@*"):
            holder = Holder.parse(self._get(f"{folder}/{name}"))
            if holder is not None and not holder.expired():
                continue
            try:
                self._delete_object(f"{folder}/{name}")
            except OSError as e:
                problems.append(f"cannot remove the dead evaluator's lease {self.describe(f'{folder}/{name}')}: {e}")
        _remove_dead_local("pin")
        return problems

    def clean_leftovers(self) -> list[str]:
        """See `Storage.clean_leftovers`: nothing of the bucket's (its unlisted checkpoints are the saver's).

        Staging folders (and local TensorBoard mirrors) of dead trainers of this machine go too, without a word
        to the user: they
        may be any run's, and a local copy is no part of the run (every committed file is in the bucket).
        """
        removed = _remove_dead_local("stage") + _remove_dead_local("mirror")
        if removed:
            log.debug("removed %d local staging folder(s) of dead processes: %s", len(removed), ", ".join(removed))
        return []

    def watch(self, names: Collection[str], on_change: Callable[[], None], *, on_lost: Callable[[], None],
              poll: bool, poll_secs: float) -> Poller:
        """See `Storage.watch`: a thread stats the state file every `poll_secs` (`poll` is always so here).

        Of `names`, the state file alone when it is one of them (`polls_state_file_only`): one request per poll.
        """
        keys = [STATE_FILE] if STATE_FILE in names else sorted(names)
        return Poller(self, keys, on_change, on_lost, poll_secs)


@dataclasses.dataclass
class Holder:
    """Who holds a lock or a lease object, and until when."""

    host: str  # the holder's machine
    pid: int  # the holder's process there
    owner: str  # a random id of this holding, so that a holder tells its own object from a successor's
    expires: float  # seconds since the epoch after which the object no longer counts
    note: str  # what the holder wrote for a refused process to show (the trainer: its host and pid)
    ttl: float = dataclasses.field(default=0.0, compare=False)  # how far each renewal moves `expires` (not stored)

    @classmethod
    def mine(cls, note: str, ttl: float) -> Holder:
        return cls(socket.gethostname(), os.getpid(), secrets.token_hex(8), time.time() + ttl, note, ttl)

    @classmethod
    def parse(cls, data: bytes | None) -> Holder | None:
        try:
            obj = json.loads((data or b"").decode("utf-8"))
            return cls(str(obj["host"]), int(obj["pid"]), str(obj["owner"]), float(obj["expires"]),
                       str(obj.get("note", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def encode(self) -> bytes:
        fields = dataclasses.asdict(self)
        del fields["ttl"]
        return json.dumps(fields).encode("utf-8")

    def expired(self) -> bool:
        """Out of time, or (on this machine, where a pid is exact) its process is dead."""
        return time.time() > self.expires or (self.host == socket.gethostname() and not pid_alive(self.pid))

    def why_free(self) -> str:
        return "ran out of time" if time.time() > self.expires else "died"

    def who(self) -> str:
        return f"process {self.pid} on {self.host}"


class Renewer:
    """A thread that pushes a held object's expiry forward every third of its time to live."""

    def __init__(self, storage: ObjectStorage, key: str, holder: Holder) -> None:
        self.storage, self.key, self.holder = storage, key, holder
        self.ttl = holder.ttl
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"renew {key}", daemon=True)

    def __enter__(self) -> Renewer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.ttl / 3):
            try:
                current = Holder.parse(self.storage._get(self.key))
                if current is not None and current.owner != self.holder.owner:
                    log.error("%s was taken over by %s", self.storage.describe(self.key), current.who())
                    return
                self.holder.expires = time.time() + self.ttl
                self.storage.write(self.key, self.holder.encode())
            except OSError as e:  # retried already; the next round tries again before the time runs out
                log.warning("cannot renew %s: %s", self.storage.describe(self.key), one_line(e))


class Poller:
    """Poll the Stat of a few keys; call `on_change` when any token differs from the last poll."""

    def __init__(self, storage: ObjectStorage, keys: list[str], on_change: Callable[[], None],
                 on_lost: Callable[[], None], poll_secs: float) -> None:
        self.storage, self.keys, self.poll_secs = storage, keys, poll_secs
        self.on_change, self.on_lost = on_change, on_lost
        self.stop = threading.Event()
        self.polls = 0
        self.thread = threading.Thread(target=self._run, name="bucket poller", daemon=True)

    def __enter__(self) -> None:
        self.tokens = self._tokens()
        self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _tokens(self) -> list[str | None]:
        stats = [self.storage.stat(k) for k in self.keys]
        return [s.token if s else None for s in stats]

    def _run(self) -> None:
        while not self.stop.wait(self.poll_secs):
            try:
                tokens = self._tokens()
            except OSError as e:
                log.warning("polling %s: %s", self.storage.root, one_line(e))
                self.on_lost()  # what changed meanwhile is unknown: the caller rescans
                continue
            self.polls += 1
            if tokens != self.tokens:
                self.tokens = tokens
                self.on_change()


def check_key(key: str, *, allow_root: bool = True) -> str:
    """`key` itself when it is relative to the workdir (no `..`, no empty part); else ValueError."""
    parts = key.split("/") if key else []
    if key.startswith("/") or any(p in ("..", "", ".") for p in parts) or (not key and not allow_root):
        raise ValueError(f"storage key {key!r} is not relative to the workdir")
    return key


def _relative(key: str, target: str) -> str:
    """Where pointer `key` pointing at `target` (relative to the pointer's folder) leads."""
    folder = key.rpartition("/")[0]
    return check_key(f"{folder}/{target}" if folder else target)


def _parts_folder(key: str) -> str:
    folder, _, name = key.rpartition("/")
    return f"{folder}/.{name}.parts" if folder else f".{name}.parts"


def _stat(info: dict[str, Any]) -> Stat:
    """A Stat from fsspec's `info`: the token is the GCS generation, or the S3 ETag with its time."""
    if info.get("type") == "directory":
        return Stat(size=0, mtime=0.0, token="folder", origin="folder")
    when = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if isinstance(when, str):  # GCS JSON: RFC 3339
        when = datetime.datetime.fromisoformat(when.replace("Z", "+00:00"))
    mtime = float(when.timestamp()) if when is not None and hasattr(when, "timestamp") else 0.0
    token = str(info.get("generation") or f"{info.get('ETag')}@{mtime}")
    return Stat(size=int(info.get("size") or 0), mtime=mtime, token=token, origin=token)


def _remove_dead_local(kind: str) -> list[str]:
    """Remove `<tmp>/ckpt-watch-<kind>-<pid>-*` folders whose process is dead; return their names."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{LOCAL_PREFIX}{kind}-*"):
        pid = folder.name[len(LOCAL_PREFIX) + len(kind) + 1:].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed
