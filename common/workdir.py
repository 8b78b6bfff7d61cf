"""Names of the files the two programs share inside a workdir (besides checkpoints and the state file).

What the shared files hold, and their typed reads and writes, is in `common.protocol`.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from common.paths import OutsideError, remove

RUN_FILE = "run.json"  # what the run was trained with (common.runconfig)
DONE_FILE = "done.json"  # written by the trainer when it reached --steps
HEARTBEAT_FILE = "heartbeat.json"  # the trainer's last step, speed and time, rewritten about once a second
EVAL_DIR = "eval"  # everything the evaluator writes
LEDGER_FILE = "results.jsonl"  # eval/results.jsonl: one JSON object per evaluation
STOP_REQUEST_FILE = "stop_request.json"  # written by the evaluator (--patience) to stop the trainer early
BEST_LINK = "best"  # eval/best -> eval/best-<step>-<id>/: the best checkpoint's files and its best.json
BEST_JSON = "best.json"  # eval/best.json -> best/best.json, so both always change together
LEASE_DIR = "leases"  # eval/leases/<checkpoint>@<pid>: checkpoints an evaluator is reading
TB_DIR = "tb"  # TensorBoard logs: tb/train from the trainer, tb/eval from the evaluator


def read_json(path: Path) -> dict[str, Any] | None:
    """Read a small JSON object written atomically by the other process; None if absent or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_best(workdir: Path) -> dict[str, Any] | None:
    """The best checkpoint's entry (eval/best.json) as written, or None (typed: common.protocol.BestEntry)."""
    return read_json(workdir / EVAL_DIR / BEST_JSON)


def lease_path(workdir: Path, checkpoint: str, pid: int) -> Path:
    """The lease file an evaluator holds while it reads `checkpoint`."""
    return workdir / EVAL_DIR / LEASE_DIR / f"{checkpoint}@{pid}"


def write_lease(path: Path) -> None:
    """Create a lease file holding this machine's name (so only this machine judges its pid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(socket.gethostname() + "\n", encoding="utf-8")


def leased(workdir: Path) -> set[str]:
    """Checkpoints that a live evaluator process is reading now (leases of dead processes are ignored)."""
    folder = workdir / EVAL_DIR / LEASE_DIR
    names = set()
    for lease in folder.glob("*@*") if folder.is_dir() else []:
        name, _, pid = lease.name.rpartition("@")
        if pid.isdigit() and pid_alive(int(pid)):
            names.add(name)
    return names


def remove_dead_leases(workdir: Path) -> list[str]:
    """Delete the leases of evaluators of this machine that have exited; return why any was kept.

    A lease names its machine; one from another machine is left alone, since its pid means nothing
    here. Leases of older versions hold no name and came from this machine.
    """
    folder = workdir / EVAL_DIR / LEASE_DIR
    problems = []
    for lease in folder.glob("*@*") if folder.is_dir() else []:
        pid = lease.name.rpartition("@")[2]
        if not pid.isdigit() or pid_alive(int(pid)) or _lease_host(lease) not in ("", socket.gethostname()):
            continue
        try:
            remove(lease, workdir)
        except (OutsideError, OSError) as e:
            problems.append(f"cannot remove the dead evaluator's lease {lease}: {e}")
    return problems


def _lease_host(lease: Path) -> str:
    try:
        with open(lease, "rb") as f:
            return f.read(256).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
