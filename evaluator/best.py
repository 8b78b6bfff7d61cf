"""`eval/best/`: the files of the best checkpoint so far, and `eval/best.json` describing it.

`eval/best` is a symlink to a complete folder `eval/best-<step>-<id>/` that holds the checkpoint's
hard-linked files, a `checkpoint` state file (so `tf.train.latest_checkpoint("eval/best")` works)
and `best.json`; `eval/best.json` is a symlink to `best/best.json`. Replacing the one `best`
symlink by a rename switches files and description together, so a crash can never leave them
disagreeing. Ties keep the earlier checkpoint.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from common import checkpoints
from common.checkpoints import State
from common.fileio import atomic_write_json, fsync_path
from common.workdir import BEST_JSON, BEST_LINK, EVAL_DIR, pid_alive, read_best


def improves(record: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether an ok record beats the current best (strictly: ties keep the earlier step)."""
    if record.get("status") != "ok" or record.get("accuracy") is None:
        return False
    return best is None or float(record["accuracy"]) > float(best.get("accuracy", -1.0))


def promote(workdir: Path, private_prefix: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Make the snapshot folder holding `private_prefix` the new best; return the best.json entry."""
    eval_dir = workdir / EVAL_DIR
    folder = private_prefix.parent
    name = private_prefix.name
    entry = {
        "step": record["step"], "checkpoint": name, "accuracy": record["accuracy"], "loss": record["loss"],
        "split": record["split"], "weights": record["weights"], "committed": record["committed"],
        "source": str(checkpoints.resolve(workdir, name)), "time": time.time(),
    }
    checkpoints.write_state(folder, State(latest=name, paths=[name], timestamps=[record["committed"]]))
    atomic_write_json(folder / BEST_JSON, entry)
    target = eval_dir / f"best-{record['step']}-{secrets.token_hex(3)}"
    os.rename(folder, target)
    link = eval_dir / BEST_LINK
    previous = os.readlink(link) if link.is_symlink() else None
    _replace_symlink(link, target.name)
    if not (eval_dir / BEST_JSON).is_symlink():
        _replace_symlink(eval_dir / BEST_JSON, f"{BEST_LINK}/{BEST_JSON}")
    fsync_path(eval_dir)
    if previous:
        shutil.rmtree(eval_dir / previous, ignore_errors=True)
    return entry


def _replace_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.link-{secrets.token_hex(3)}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def clean_stale(workdir: Path) -> None:
    """Remove best folders the `best` link no longer points to, and leftovers of interrupted switches."""
    eval_dir = workdir / EVAL_DIR
    link = eval_dir / BEST_LINK
    current = os.readlink(link) if link.is_symlink() else None
    for path in eval_dir.glob("best-*"):
        if path.name != current and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    for path in eval_dir.glob(".*.link-*"):
        path.unlink(missing_ok=True)
    for path in eval_dir.glob(".snapshot-*"):
        pid = path.name.split("-")[1]
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def best_prefix(workdir: Path) -> Path | None:
    """The prefix of the best checkpoint's files under eval/best, or None."""
    entry = read_best(workdir)
    if entry is None:
        return None
    return workdir / EVAL_DIR / BEST_LINK / str(entry["checkpoint"])
