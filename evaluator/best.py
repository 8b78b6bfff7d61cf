"""`eval/best/`: the files of the best checkpoint so far, and `eval/best.json` describing it.

`eval/best` is a symlink to a complete folder `eval/best-<step>-<id>/` that holds the checkpoint's
hard-linked files, a `checkpoint` state file (so `tf.train.latest_checkpoint("eval/best")` works)
and `best.json`; `eval/best.json` is a symlink to `best/best.json`. Replacing the one `best`
symlink by a rename switches files and description together, so a crash can never leave them
disagreeing. Ties keep the earlier checkpoint.

Every delete goes through `common.paths.remove`, and only folders named `best-*` directly in
`eval/` are ever removed as old bests: a `best` link edited to point elsewhere makes nothing
outside the workdir disappear. What is refused is passed to `warn`, never dropped.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import checkpoints
from common.checkpoints import State
from common.fileio import atomic_write_bytes, atomic_write_json, fsync_path
from common.paths import OutsideError, remove
from common.workdir import BEST_JSON, BEST_LINK, EVAL_DIR, pid_alive, read_best, read_json, remove_dead_leases
from evaluator.ledger import FINGERPRINT, Record
from evaluator.snapshot import Gone, snapshot

Warn = Callable[[str], None]
_FOLDER_PREFIX = f"{BEST_LINK}-"


def _to_stderr(message: str) -> None:
    print(f"evaluator: warning: {message}", file=sys.stderr)


def improves(record: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether an ok record beats the current best (strictly: ties keep the earlier step)."""
    if record.get("status") != "ok" or record.get("accuracy") is None:
        return False
    return best is None or float(record["accuracy"]) > float(best.get("accuracy", -1.0))


def promote(workdir: Path, private_prefix: Path, record: dict[str, Any], *,
            warn: Warn = _to_stderr) -> dict[str, Any]:
    """Make the snapshot folder holding `private_prefix` the new best; return the best.json entry.

    Raises:
      OSError: the switch could not be made (full disk, read-only); the old best is left as it was.
    """
    eval_dir = workdir / EVAL_DIR
    folder = private_prefix.parent
    name = private_prefix.name
    entry = {
        "step": record["step"], "checkpoint": name, "accuracy": record["accuracy"], "loss": record["loss"],
        "split": record["split"], "weights": record["weights"], "committed": record["committed"],
        "source": str(checkpoints.resolve(workdir, name)), "time": time.time(),
    }
    adopt_copied_best(workdir, warn=warn)
    checkpoints.write_state(folder, State(latest=name, paths=[name], timestamps=[record["committed"]]))
    atomic_write_json(folder / BEST_JSON, entry)
    target = eval_dir / f"{_FOLDER_PREFIX}{record['step']}-{secrets.token_hex(3)}"
    os.rename(folder, target)
    link = eval_dir / BEST_LINK
    previous = os.readlink(link) if link.is_symlink() else None
    _replace_symlink(link, target.name)
    if not (eval_dir / BEST_JSON).is_symlink():
        _replace_symlink(eval_dir / BEST_JSON, f"{BEST_LINK}/{BEST_JSON}")
    fsync_path(eval_dir)
    if previous is not None:
        _remove_previous(workdir, previous, warn)
    return entry


def catch_up(workdir: Path, records: list[Record], *, weights: str, warn: Warn = _to_stderr) -> dict[str, Any] | None:
    """Promote the ledger's best validation result if eval/best lags behind it; return the new entry or None.

    The ledger is written before a promotion, so a promotion that failed (full disk) or was cut
    short (a crash) leaves the ledger ahead. Only a checkpoint still in the workdir with the
    `.index` fingerprint the ledger recorded is used: the files must be those that were evaluated.

    Raises:
      OSError: the promotion failed again; the old best is left as it was.
    """
    best = read_best(workdir)
    ranked = [r for r in records if r.get("split") == "validation" and r.get("weights") == weights
              and r.get(FINGERPRINT) and improves(r, best)]
    ranked.sort(key=lambda r: -float(r["accuracy"]))  # stable: ties keep the earlier evaluation
    for record in ranked:
        name = str(record["checkpoint"])
        prefix = checkpoints.resolve(workdir, name)
        if not checkpoints.inside(workdir, name) or checkpoints.index_fingerprint(prefix) != record[FINGERPRINT]:
            continue
        try:
            with snapshot(prefix, workdir / EVAL_DIR) as private:
                if checkpoints.index_fingerprint(private) == record[FINGERPRINT]:
                    return promote(workdir, private, record, warn=warn)
        except Gone:
            continue
    return None


def _remove_previous(workdir: Path, previous: str, warn: Warn) -> None:
    """Delete the folder the `best` link named before, if it is one of ours."""
    eval_dir = workdir / EVAL_DIR
    if _own_folder(previous) is None:
        warn(f"{eval_dir / BEST_LINK} pointed to {previous}, which is not a best folder of this workdir: "
             "left it in place")
        return
    _remove(eval_dir / previous, workdir, warn)


def _own_folder(target: str) -> str | None:
    """The folder name if link target `target` is a `best-*` folder directly in eval/, else None."""
    return target if target.startswith(_FOLDER_PREFIX) and os.path.basename(target) == target else None


def _remove(path: Path, workdir: Path, warn: Warn) -> None:
    try:
        remove(path, workdir)
    except OutsideError as e:
        warn(str(e))
    except OSError as e:
        warn(f"cannot delete {path}: {e.strerror or e}")


def _replace_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.link-{secrets.token_hex(3)}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def adopt_copied_best(workdir: Path, *, warn: Warn = _to_stderr) -> None:
    """Turn an `eval/best` that is a real folder (a workdir copied with `cp -rL` or `scp -r`) into a link.

    The folder keeps its files and stays the best: it is renamed to `eval/best-<step>-<id>/` and
    linked, as if this evaluator had made it. Anything else at `eval/best` is moved aside to
    `eval/best.moved-<id>`, never deleted. Raises OSError when the workdir cannot be changed.
    """
    eval_dir = workdir / EVAL_DIR
    link, described = eval_dir / BEST_LINK, eval_dir / BEST_JSON
    if link.is_symlink() or not link.exists():
        return
    if link.is_dir() and not (link / BEST_JSON).exists() and described.is_file() and not described.is_symlink():
        atomic_write_bytes(link / BEST_JSON, described.read_bytes())
    entry = read_json(link / BEST_JSON) if link.is_dir() else None
    if entry is None:
        aside = eval_dir / f"{BEST_LINK}.moved-{secrets.token_hex(3)}"
        os.rename(link, aside)
        warn(f"{link} was not a best folder this program can use: moved it to {aside}")
        return
    step = entry.get("step")
    target = eval_dir / f"{_FOLDER_PREFIX}{step if isinstance(step, int) else 'copied'}-{secrets.token_hex(3)}"
    os.rename(link, target)
    _replace_symlink(link, target.name)
    if not described.is_symlink():
        _replace_symlink(described, f"{BEST_LINK}/{BEST_JSON}")
    fsync_path(eval_dir)
    warn(f"{link} was a folder, not a link (a copied workdir?): kept it as {target.name}, linked from {link}")


def clean_stale(workdir: Path, *, warn: Warn = _to_stderr) -> None:
    """Remove best folders the `best` link no longer points to, leftovers of interrupted switches and dead leases."""
    eval_dir = workdir / EVAL_DIR
    if not eval_dir.is_dir():
        return
    try:
        adopt_copied_best(workdir, warn=warn)
    except OSError as e:
        warn(f"cannot turn the folder {eval_dir / BEST_LINK} into a link: {e.strerror or e}")
    link = eval_dir / BEST_LINK
    current = _own_folder(os.readlink(link)) if link.is_symlink() else None
    if link.is_symlink() and current is None:
        # Not knowing which folder is the best, keep them all rather than delete the wrong one.
        warn(f"{link} points to {os.readlink(link)}, not to a best folder of this workdir: "
             "kept every best folder; the next improvement replaces the link")
    else:
        for path in eval_dir.glob(f"{_FOLDER_PREFIX}*"):
            if path.name != current and (path.is_dir() or path.is_symlink()):
                _remove(path, workdir, warn)
    for path in eval_dir.glob(".*.link-*"):
        _remove(path, workdir, warn)
    for path in eval_dir.glob(".snapshot-*"):
        pid = path.name.split("-")[1]
        if not (pid.isdigit() and pid_alive(int(pid))):
            _remove(path, workdir, warn)
    for problem in remove_dead_leases(workdir):
        warn(problem)


def best_prefix(workdir: Path) -> Path | None:
    """The prefix of the best checkpoint's files under eval/best, or None."""
    entry = read_best(workdir)
    if entry is None:
        return None
    return workdir / EVAL_DIR / BEST_LINK / str(entry["checkpoint"])
