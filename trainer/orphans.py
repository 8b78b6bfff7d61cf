"""Checkpoints an interrupted save left above the last commit, which the state file never listed.

A save writes (or uploads) a checkpoint's files first and lists it in the state file last. A
trainer killed in between leaves `model-N.*` files with N above every step the state file lists.
A relaunch that trains past N writes over them; one with a lower `--steps` would leave them for
good (in a bucket, objects that nobody lists and everybody pays for). The trainer holding the
workdir's lock removes them at its start, as it removes older checkpoints the state file dropped
(`saver.remove_unlisted`).

Only checkpoints whose every file is at least as new as the state file count: they were written
after the last commit, so no commit can have listed them. One older than the state file is not
this rule's to judge, and stays.
"""

from __future__ import annotations

from common.checkpoint import checkpoints
from common.run.workdir import Workdir


def never_listed(workdir: Workdir, listed: set[str], newest: int) -> list[str]:
    """Checkpoints of steps above `newest` not in `listed`, every file written after the last commit; by step."""
    storage = workdir.storage
    committed = storage.stat(checkpoints.STATE_FILE)
    if committed is None:
        return []
    # Every `model-N.*` object counts, not just those with an index: uploads go index last, so a kill
    # during a save's upload leaves data shards without one.
    steps = {checkpoints.step_of(n.partition(".")[0]) for n in storage.names("", f"{checkpoints.PREFIX}-*")}
    names = [checkpoints.name_for(s) for s in sorted(s for s in steps if s is not None and s > newest)]
    return [n for n in names if n not in listed and _written_after(workdir, n, committed.mtime)]


def _written_after(workdir: Workdir, name: str, when: float) -> bool:
    """Whether every file of checkpoint `name` is at least as new as `when` (and it has any)."""
    stats = [workdir.storage.stat(key) for key in workdir.storage.checkpoint_files(name)]
    return bool(stats) and all(s is not None and s.mtime >= when for s in stats)
