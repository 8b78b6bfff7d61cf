"""`LocalStorage`: a workdir in a local folder, with the crash-safety guarantees of `tests/fault/`.

How each operation of `common.storage.Storage` is made safe on a local disk:
  - writes: a temp file in the same folder, fsync, rename, fsync of the folder (`common.storage.fileio`);
  - appends: `O_APPEND`, fsync, and the file cut back to its old length when a write fails;
  - deletes: `common.storage.paths.remove`, refused unless the target resolves inside the root;
  - pins: hard links into a private folder, so a delete by the trainer's retention removes only a
    name while the evaluator reads; a file replaced while being linked (another inode) is `Gone`;
  - locks: `flock`, which the kernel releases however the holder exits;
  - leases: `eval/leases/<checkpoint>@<pid>` holding the machine's name; a lease counts while
    that pid lives (on this machine), which is exact, so local leases need no expiry time;
  - change notices: watchdog (inotify, or polling);
  - pointers: symlinks replaced by a rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import functools
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from common.errors import UsageError, WorkdirIOError
from common.layout import CHECKPOINT_PREFIX, EVAL_DIR, LEASE_DIR, lease_path
from common.storage.api import Gone, Locked, Stat, checkpoint_keys, require_complete
from common.storage.fileio import TMP_MARK, atomic_write_bytes, fsync_path
from common.storage.paths import OutsideError, remove

OVERFLOW_LOGGER = "watchdog.observers.inotify_c"  # where watchdog 7 reports an overflowed inotify queue
PIN_PREFIX = ".snapshot-"  # eval/.snapshot-<pid>-<id>/: a pinned checkpoint
log = logging.getLogger("ckpt_watch.storage")
_RELEVANT = frozenset({"created", "modified", "moved", "closed"})


class LocalStorage:
    """A workdir that is a local folder (see the module docstring for how each operation is made safe)."""

    polls_state_file_only = False
    default_poll_secs = 1.0
    held = "on disk"

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.path = Path(workdir)
        self.root = os.fspath(workdir)

    def _at(self, key: str) -> Path:
        return _join(self.path, key)

    def describe(self, key: str) -> str:
        return str(self._at(key))

    def location(self, key: str = "") -> Path:
        return self._at(key) if key else self.path

    def key_of(self, path: str) -> str | None:
        target = os.path.normpath(self._resolve(path))
        relative = os.path.relpath(target, os.path.abspath(self.path))
        return None if relative == "." or relative.startswith("..") else Path(relative).as_posix()

    def _resolve(self, path: str) -> Path:
        """A state file's path as a local path: relative to the root, or absolute (a TF1 Saver writes those).

        An absolute path into the root by another spelling (a symlink) is the root's; so is one that
        names no checkpoint where it points, when the root holds one of that file name (a moved workdir).
        """
        p = Path(path)
        named = p if p.is_absolute() else self.path / p
        if named.parent == self.path:
            return named
        mine = self.path / p.name
        if os.path.realpath(named.parent) == os.path.realpath(self.path):
            return mine
        if not Path(f"{named}.index").exists() and Path(f"{mine}.index").exists():
            return mine
        return named

    def local_folder(self) -> Path:
        return self.path

    def exists(self) -> bool:
        return self.path.is_dir()

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def why_unwritable(self) -> str | None:
        probe = self.path
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            return f"{probe} is not a folder"
        if not os.access(probe, os.W_OK | os.X_OK):
            return f"{probe} is not writable"
        return None

    def write(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self._at(key), data)

    def read(self, key: str, *, limit: int | None = None) -> bytes | None:
        try:
            with open(self._at(key), "rb") as f:
                return f.read(-1 if limit is None else limit)
        except FileNotFoundError:
            return None

    def read_from(self, key: str, offset: int) -> tuple[Stat, bytes] | None:
        try:
            with open(self._at(key), "rb") as f:
                stat = _stat(os.fstat(f.fileno()))
                f.seek(offset)
                return stat, f.read()
        except FileNotFoundError:
            return None

    def append(self, key: str, data: bytes) -> None:
        path = self._at(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        if created:
            fsync_path(path.parent)

    def names(self, folder: str = "", pattern: str = "*") -> list[str]:
        try:
            names = os.listdir(self._at(folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(fnmatch.filter(names, pattern))

    def stat(self, key: str) -> Stat | None:
        try:
            return _stat(os.stat(self._at(key)))
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        remove(self._at(key), self.path)

    def checkpoint_files(self, name: str) -> list[str]:
        return checkpoint_keys(self, name)

    def checkpoint_target(self, name: str) -> str:
        return str(self._at(name))

    def commit_checkpoint(self, name: str, *, state_key: str, state: bytes) -> None:
        # TF wrote the files in place; fsynced, the state file never names data still in flight.
        for key in self.checkpoint_files(name):
            fsync_path(self._at(key))
        self.write(state_key, state)

    @contextlib.contextmanager
    def readable(self, name: str) -> Iterator[Path]:
        """See `Storage.readable`: the files in place."""
        yield self._at(name)

    @contextlib.contextmanager
    def pin(self, name: str) -> Iterator[Path]:
        """See `Storage.pin`: hard links in `eval/.snapshot-<pid>-<id>@<host>/`, on the workdir's filesystem.

        The folder names its machine, so that an evaluator on another host of a shared filesystem
        never takes it for a dead process's (a pid is exact only on its own machine).
        """
        scratch = self.path / EVAL_DIR
        folder = scratch / f"{PIN_PREFIX}{os.getpid()}-{secrets.token_hex(4)}@{socket.gethostname()}"
        folder.mkdir(parents=True)
        try:
            _link_checkpoint(self, name, folder)
            yield folder / name.rpartition("/")[2]
        finally:
            try:
                remove(folder, scratch)
            except OSError as e:  # the pin's use is over: the next evaluator start removes the folder of a dead pid
                log.warning("cannot remove the pinned copy %s: %s", folder, e.strerror or e)

    @contextlib.contextmanager
    def lock(self, key: str, *, wait: bool, note: str = "", discard: bool = False) -> Iterator[None]:
        path = self._at(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._flock(path, wait=wait)
        try:
            if note:
                os.ftruncate(fd, 0)
                os.write(fd, note.encode("utf-8"))
            yield
        finally:
            if discard:  # while still held: a process that opens the name after this makes a new file
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            os.close(fd)  # closing releases the flock; without `discard` the file stays for the next holder

    @staticmethod
    def _flock(path: Path, *, wait: bool) -> int:
        """Open `path` and flock it; the fd. Retried while the file taken was unlinked meanwhile (a discarded lock)."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown process"
                os.close(fd)
                raise Locked(holder) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder before us discarded this file: lock the name's new file instead

    @contextlib.contextmanager
    def lease(self, name: str, *, ttl: float | None = None) -> Iterator[None]:
        path = lease_path(self.path, name, os.getpid())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(socket.gethostname() + "\n", encoding="utf-8")  # so only this machine judges its pid
        except OSError:
            with contextlib.suppress(OSError, OutsideError):
                remove(path, self.path)  # a half-written lease (full disk) would outlive this process
            raise
        try:
            yield
        finally:
            # A lease left behind is harmless: it names a dead pid, and the next start removes it.
            with contextlib.suppress(OSError, OutsideError):
                remove(path, self.path)

    def leased(self) -> set[str]:
        names = set()
        for lease in self.names(f"{EVAL_DIR}/{LEASE_DIR}", "*@*"):
            name, _, pid = lease.rpartition("@")
            if pid.isdigit() and pid_alive(int(pid)):
                names.add(name)
        return names

    def clean_readers(self) -> list[str]:
        """See `Storage.clean_readers`: leases of dead evaluators of this machine, and their pinned copies.

        A lease and a pinned copy name their machine; one from another machine is left alone, since
        its pid means nothing here. Those of older versions name none and came from this machine.
        """
        problems = []
        for name in self.names(EVAL_DIR, f"{PIN_PREFIX}*"):
            owner, _, host = name[len(PIN_PREFIX):].partition("@")
            pid = owner.split("-")[0]
            if host in ("", socket.gethostname()) and not (pid.isdigit() and pid_alive(int(pid))):
                problems += self._remove(f"{EVAL_DIR}/{name}", "")
        folder = f"{EVAL_DIR}/{LEASE_DIR}"
        for name in self.names(folder, "*@*"):
            pid = name.rpartition("@")[2]
            key = f"{folder}/{name}"
            if not pid.isdigit() or pid_alive(int(pid)) or self._lease_host(key) not in ("", socket.gethostname()):
                continue
            problems += self._remove(key, "the dead evaluator's lease ")
        return problems

    def _remove(self, key: str, what: str) -> list[str]:
        try:
            self.delete(key)
        except OutsideError as e:
            return [str(e)]
        except OSError as e:
            return [f"cannot remove {what}{self.describe(key)}: {e.strerror or e}"]
        return []

    def _lease_host(self, key: str) -> str:
        try:
            return (self.read(key, limit=256) or b"").decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def clean_leftovers(self) -> list[str]:
        """See `Storage.clean_leftovers`: TF's `<name>_temp/` folders and this project's temp files."""
        removed = []
        for name in self.names():
            path = self.path / name
            staged = fnmatch.fnmatch(name, f"{CHECKPOINT_PREFIX}-*_temp") and path.is_dir()  # TF's staging folder
            if not (staged or (TMP_MARK in name and path.is_file())):
                continue
            try:
                remove(path, self.path)
            except OutsideError:
                continue
            except OSError as e:  # said, with what is in the way (exit 5), rather than left there for good
                raise WorkdirIOError(f"cannot remove {path}, left by an interrupted save: {e.strerror or e}") from e
            removed.append(name)
        return removed

    @contextlib.contextmanager
    def watch(self, names: Collection[str], on_change: Callable[[], None], *, on_lost: Callable[[], None],
              poll: bool, poll_secs: float) -> Iterator[None]:
        observer = PollingObserver(timeout=poll_secs) if poll else Observer()
        overflow = OverflowFilter(on_lost)
        logger = logging.getLogger(OVERFLOW_LOGGER)
        logger.addFilter(overflow)
        try:
            _start(observer, NameHandler(names, on_change), self.path)
            try:
                yield
            finally:
                observer.stop()
                observer.join()
        finally:
            logger.removeFilter(overflow)

    def point(self, key: str, target: str) -> None:
        link = self._at(key)
        tmp = link.with_name(f".{link.name}.link-{secrets.token_hex(3)}")
        os.symlink(target, tmp)
        os.replace(tmp, link)
        fsync_path(link.parent)

    def pointer(self, key: str) -> str | None:
        link = self._at(key)
        return os.readlink(link) if link.is_symlink() else None

    def is_folder(self, key: str) -> bool:
        path = self._at(key)
        return path.is_dir() or path.is_symlink()

    def through(self, key: str) -> str:
        return key  # the kernel follows the link

    def publish(self, folder: Path, key: str, *, last: str) -> None:
        out = self._at(key)
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.with_name(f".{out.name}-{secrets.token_hex(3)}")
        shutil.copytree(folder, staged)
        if out.exists() or out.is_symlink():
            remove(out, self.path)
        os.rename(staged, out)

    def adopt(self, folder: Path, key: str) -> None:
        os.rename(folder, self._at(key))


@functools.lru_cache(maxsize=4096)
def _join(root: Path, key: str) -> Path:
    """`root`/`key`, checked once per key (cached: the ledger and the state file are read on every scan)."""
    parts = key.split("/") if key else []
    if key.startswith("/") or any(p in ("..", "") for p in parts):
        raise ValueError(f"storage key {key!r} is not relative to the workdir")
    return root.joinpath(*parts)


def _stat(st: os.stat_result) -> Stat:
    return Stat(size=st.st_size, mtime=st.st_mtime, token=f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}",
                origin=f"{st.st_dev}:{st.st_ino}")


def _link_checkpoint(storage: LocalStorage, name: str, folder: Path) -> None:
    """Hard-link checkpoint `name`'s files into `folder`; Gone when they vanish or change meanwhile."""
    keys = storage.checkpoint_files(name)
    require_complete(name, keys)
    files = [storage.path / k for k in keys]
    for file in files:
        try:
            os.link(file, folder / file.name)
        except FileNotFoundError:
            raise Gone(f"{file.name} was deleted while being read") from None
    # The trainer replaces a checkpoint by deleting then rewriting it: a changed inode means
    # the links may mix two versions.
    for file in files:
        try:
            same = os.stat(file).st_ino == os.stat(folder / file.name).st_ino
        except FileNotFoundError:
            same = True  # deleted after linking: our link holds the complete old version
        if not same:
            raise Gone(f"{file.name} was replaced while being read")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine: it exists and is not a zombie (dead, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text("utf-8", "replace")
    except OSError:
        return True  # no /proc (or it went meanwhile): existing is all that is known
    return stat.rpartition(")")[2].split()[:1] != ["Z"]  # the state follows the command name, which may hold ")"


class NameHandler(FileSystemEventHandler):
    """Call `on_change` when an entry in `names` is created, changed or renamed into place.

    It never trusts an event's content: the caller re-reads. TF and this project replace the state
    file by a rename, so a `moved` event whose destination is watched matters as much as `created`.
    """

    def __init__(self, names: Collection[str], on_change: Callable[[], None]) -> None:
        super().__init__()
        self.names = frozenset(names)
        self.on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _RELEVANT:
            return
        paths = (event.src_path, getattr(event, "dest_path", "") or "")
        if any(os.path.basename(os.fsdecode(p)) in self.names for p in paths):
            self.on_change()


class OverflowFilter(logging.Filter):
    """Swallow watchdog's "Inotify queue overflowed" warning (no event reaches a handler) and call `on_lost`."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        super().__init__()
        self.on_lost = on_lost

    def filter(self, record: logging.LogRecord) -> bool:
        if "queue overflowed" in record.getMessage():
            self.on_lost()
            return False
        return True


def _start(observer: BaseObserver, handler: NameHandler, folder: Path) -> None:
    """Schedule and start the observer; a one-line error when the system refuses."""
    try:
        observer.schedule(handler, str(folder), recursive=False)
        observer.start()
    except OSError as e:  # the inotify watch or instance limit, a folder that vanished
        raise UsageError(f"cannot watch {folder}: {e.strerror or e} (--poll watches without inotify)") from e
