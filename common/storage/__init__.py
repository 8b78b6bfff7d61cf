"""The storage seam: every operation the two programs do on a workdir, behind one small interface.

A workdir is addressed by string keys relative to its root, with `/` between folders
(`checkpoint`, `eval/results.jsonl`, `model-100.index`), never by `pathlib.Path`, which would
turn `gs://bucket/run` into the local folder `gs:/bucket/run`. `open_storage(workdir)` picks the
implementation: `LocalStorage` (`common/storage/local.py`), a local folder with the guarantees
the crash-safety tests (`tests/fault/`) check, or `ObjectStorage` (`common/storage/objectstore.py`) for
`s3://` and `gs://`; both pass `tests/common/storage/test_contract.py`. The interface itself, with what each
method must provide, is `common/storage/api.py` (re-exported here); docs/design.md ("The storage
seam") and docs/storage.md describe it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from common.errors import UsageError
from common.layout import BEST_JSON, EVAL_DIR
from common.storage.api import Gone, Locked, Stat, Storage, checkpoint_keys
from common.storage.bucket import is_bucket_url
from common.storage.paths import Location, is_url

__all__ = ["Gone", "Locked", "Stat", "Storage", "checkpoint_keys", "open_source", "open_storage", "read_best",
           "read_json", "write_json"]


def open_storage(workdir: str | os.PathLike[str]) -> Storage:
    """The storage of `workdir`: `ObjectStorage` for `s3://` and `gs://`, `LocalStorage` for a local folder.

    Raises:
      UsageError: `workdir` is another `scheme://` URL, or a bucket that does not exist or whose
        extra is not installed (exit 2).
    """
    if is_bucket_url(workdir):
        from common.storage.objectstore import open_bucket  # here, so that the interface imports no implementation

        return open_bucket(os.fspath(workdir))
    if is_url(workdir):
        raise UsageError(f"--workdir {os.fspath(workdir)!r}: a workdir is a local folder, s3://bucket/prefix "
                         "or gs://bucket/prefix")
    from common.storage.local import LocalStorage

    return LocalStorage(workdir)


def open_source(location: Location) -> tuple[Storage, str | None]:
    """A location given for a checkpoint or for its workdir, opened once.

    Returns:
      (the storage of its folder, the checkpoint's name) when `<location>.index` exists, or when
      `location` is no folder (a missing local prefix, to be reported as such); else (the workdir's
      storage, None).
    """
    if location.name and location.parent != location:
        folder = open_storage(location.parent)
        if folder.stat(f"{location.name}.index") is not None:
            return folder, location.name
        storage = open_storage(location)
        return (storage, None) if storage.exists() else (folder, location.name)
    return open_storage(location), None


def read_best(storage: Storage) -> dict[str, Any] | None:
    """The best checkpoint's entry (eval/best.json) as written, or None (typed: common.run.protocol.BestEntry)."""
    return read_json(storage, f"{EVAL_DIR}/{BEST_JSON}")


def read_json(storage: Storage, key: str) -> dict[str, Any] | None:
    """Read a small JSON object written atomically by another process; None if absent or unreadable."""
    try:
        raw = storage.read(key)
        data = json.loads(raw.decode("utf-8")) if raw is not None else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(storage: Storage, key: str, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    storage.write(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
