"""Path checks every program applies before it writes or deletes: local paths only, deletes stay inside.

Two rules from the README's promise that nothing of the user's is lost:
  - a workdir is a local `Path` or, for `s3://` and `gs://`, a `BucketPath`, never a `Path` of a URL,
    since `pathlib.Path` would quietly turn `s3://bucket/run` into the local folder `s3:/bucket/run`;
    any other `scheme://` path is refused;
  - a delete goes ahead only when the path, with every link resolved, lies inside the folder the
    program owns (the workdir, or an output folder it created). A link is removed as a link.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

from common.errors import UsageError, WorkdirIOError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: str | os.PathLike[str]) -> bool:
    """Whether `value` looks like `scheme://...` (s3://, gs://, http://, file://)."""
    return bool(_URL.match(os.fspath(value)))


def require_local(flag: str, value: str | os.PathLike[str] | None) -> None:
    """Refuse a URL given for a path flag, with a one-line error naming the flag and the value.

    Raises:
      UsageError: `value` is a `scheme://` URL.
    """
    if value is not None and is_url(value):
        raise UsageError(f"{flag} {os.fspath(value)!r}: this flag takes a local path, not a URL")


def require_bucket_scheme(flag: str, value: str) -> None:
    """Refuse a URL that is neither s3:// nor gs://, naming the schemes a workdir takes.

    Raises:
      UsageError: `value` is a `scheme://` URL of another scheme.
    """
    if is_url(value) and not is_bucket(value):
        scheme = value.partition("://")[0]
        raise UsageError(f"{flag} {value!r}: {scheme}:// is not a storage this program reads; give a local path, "
                         "s3://bucket/prefix or gs://bucket/prefix")


class BucketPath:
    """A bucket workdir's URL (`s3://bucket/prefix`), or a key under it, carried where a local one is a `Path`.

    Joins with `/` keep the `//` that `Path` would collapse. `os.fspath` gives the URL, so that
    `open_storage` and the protocol's `read(workdir)` take it as they take a local folder; what only
    a local folder can do (TF paths, `mkdir`, links) asks `is_bucket(workdir)` first.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def __truediv__(self, key: str | os.PathLike[str]) -> BucketPath:
        return BucketPath(f"{self.url}/{os.fspath(key).strip('/')}")

    def __fspath__(self) -> str:
        return self.url

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"BucketPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BucketPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        """The last part of the URL (`model-5` of `s3://b/run/model-5`)."""
        return self.url.rpartition("/")[2]

    @property
    def parent(self) -> BucketPath:
        """The URL without its last part."""
        return BucketPath(self.url.rpartition("/")[0])


Location: TypeAlias = Path | BucketPath  # a local folder, or a bucket's s3:// or gs:// prefix


def is_bucket(value: str | os.PathLike[str]) -> bool:
    """Whether `value` is an `s3://` or `gs://` URL (a bucket workdir)."""
    return re.match(r"^(s3|gs)://", os.fspath(value)) is not None


def as_workdir(value: str | os.PathLike[str]) -> Location:
    """`value` as a workdir: a `BucketPath` for `s3://` and `gs://`, else a local `Path`.

    Raises:
      UsageError: `value` is another `scheme://` URL.
    """
    if isinstance(value, BucketPath) or is_bucket(value):
        return BucketPath(os.fspath(value))
    require_local("the path", value)
    return Path(value)


def is_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether `path` (every link resolved) lies strictly inside `root` (links resolved too)."""
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    return real != real_root and real.is_relative_to(real_root)


class OutsideError(WorkdirIOError):
    """A delete was refused because its target resolves outside the folder the program owns.

    A WorkdirIOError, so that a caller that does not handle it still ends with one line and exit 5.
    """


def remove(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> None:
    """Delete a file, a link (never what it points to) or a folder tree that lies inside `root`.

    A missing path is fine, and so is a part of the tree that vanishes meanwhile (another process
    removing it too). Raises:
      OutsideError: the path's folder, or the path itself once links are resolved, is not inside
        `root`; nothing is deleted.
      OSError: a part of it could not be deleted (no permission, a read-only or failing disk).
    """
    target = Path(path)
    if not is_inside(target.parent, root) and Path(os.path.realpath(target.parent)) != Path(os.path.realpath(root)):
        raise OutsideError(f"refused to delete {target}: it is not inside {root}")
    if target.is_symlink():
        target.unlink(missing_ok=True)
        return
    if not target.exists():
        return
    if not is_inside(target, root):
        raise OutsideError(f"refused to delete {target}: it resolves to {os.path.realpath(target)}, "
                           f"outside {root}")
    if target.is_dir():
        shutil.rmtree(target, onerror=_unless_gone)
    else:
        target.unlink(missing_ok=True)


def _unless_gone(func: Callable[..., Any], path: str, exc_info: Any) -> None:
    """`shutil.rmtree`'s error handler: an entry removed by someone else meanwhile is fine; any other error raises."""
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def local_path(flag: str) -> Callable[[str], Path]:
    """An argparse `type` for a path flag: refuses URLs with a one-line UsageError, else returns a Path.

    argparse turns only ValueError/TypeError from a `type` into its usage message; a UsageError
    passes through to the program's own one-line error handling.
    """

    def convert(value: str) -> Path:
        require_local(flag, value)
        return Path(value)

    convert.__name__ = "path"
    return convert


def workdir_path(flag: str) -> Callable[[str], Location]:
    """An argparse `type` for a workdir or checkpoint flag: a local `Path`, or a `BucketPath` for s3:// and gs://."""
    local = local_path(flag)

    def convert(value: str) -> Location:
        require_bucket_scheme(flag, value)
        return BucketPath(value) if is_bucket(value) else local(value)

    convert.__name__ = "path"
    return convert


def workdir_text(flag: str) -> Callable[[str], str]:
    """Like `workdir_path`, for flags whose value the program keeps as a string."""
    local = local_text(flag)

    def convert(value: str) -> str:
        require_bucket_scheme(flag, value)
        return value if is_bucket(value) else local(value)

    convert.__name__ = "path"
    return convert


def local_text(flag: str) -> Callable[[str], str]:
    """Like `local_path`, for flags whose value the program keeps as a string."""

    def convert(value: str) -> str:
        require_local(flag, value)
        return value

    convert.__name__ = "path"
    return convert


def checkpoint_place(text: str) -> Location | None:
    """Where a checkpoint given by `--from` lies when `text` names it outside the workdir, else None.

    A bucket URL (`s3://b/run/model-10`, at least a folder and a name deep), a local prefix that exists
    or an absolute one; anything else is a name in the workdir.

    Raises:
      UsageError: a bucket URL that names no checkpoint.
    """
    if is_bucket(text):
        parts = text.partition("://")[2].rstrip("/").split("/")
        if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
            raise UsageError(f"--from {text}: not a checkpoint of a bucket (give a name such as model-10, or a "
                             "prefix such as s3://bucket/run/model-10)")
        return BucketPath(text)
    return Path(text) if Path(f"{text}.index").exists() or Path(text).is_absolute() else None


def absolute(location: Location) -> str:
    """`location` as a record names it wherever it is read from: an absolute local path, or the bucket's URL."""
    return str(location) if isinstance(location, BucketPath) else os.path.abspath(location)


def local_folder_with(location: Location, name: str) -> Path | None:
    """`location` when it is a local folder holding file `name` (an export's `saved_model.pb`), else None."""
    return location if isinstance(location, Path) and (location / name).is_file() else None


def refuse_bucket(location: Location, message: str) -> None:
    """Refuse a bucket location with `message` (exit 2), for what needs a local folder."""
    if isinstance(location, BucketPath):
        raise UsageError(message)


def refuse_file(location: Location, message: str) -> None:
    """Refuse a local path that exists but is a file, not a folder, with `message` (exit 2)."""
    if isinstance(location, Path) and location.exists() and not location.is_dir():
        raise UsageError(message)


def local_only(workdir: Location, what: str) -> Path:
    """`workdir` as a local `Path`; a bucket's is refused (exit 2) for `what`, which does not take one yet."""
    if isinstance(workdir, BucketPath):
        raise UsageError(f"{what} --workdir {workdir}: a bucket workdir is not supported here yet; "
                         "give a local folder")
    return workdir
