"""What the evaluator holds while it reads a checkpoint: a lease, beside the pinned copy it reads.

The trainer's retention may delete a checkpoint at any time. A lease (`Storage.lease`) asks it
not to; the private pinned copy (`Storage.pin`: hard links locally, so a delete only removes a
name) is what makes the read safe anyway. A checkpoint whose files vanish or change while being
pinned is `Gone`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from common.errors import WorkdirIOError
from common.storage import Gone, Storage

__all__ = ["Gone", "lease"]


@contextlib.contextmanager
def lease(storage: Storage, checkpoint: str, *, ttl: float | None = None) -> Iterator[None]:
    """Tell the trainer's retention that this process is reading `checkpoint` (see `Storage.leased`).

    `ttl`: in a bucket, how long the lease outlives a holder on another host that died (see `Storage.lease`).

    Raises:
      WorkdirIOError: the lease cannot be written (read-only workdir, full disk).
    """
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(storage.lease(checkpoint, ttl=ttl))
        except OSError as e:
            raise WorkdirIOError(f"cannot write the lease on {checkpoint} in {storage.root}: "
                                 f"{e.strerror or e}") from e
        yield
