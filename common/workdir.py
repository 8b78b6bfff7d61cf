"""Names of the files the two programs share inside a workdir (besides checkpoints and the state file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"  # what the run was trained with (common.runconfig)
DONE_FILE = "done.json"  # written by the trainer when it reached --steps
HEARTBEAT_FILE = "heartbeat.json"  # the trainer's last step, speed and time, rewritten about once a second
EVAL_DIR = "eval"  # everything the evaluator writes
LEDGER_FILE = "results.jsonl"  # eval/results.jsonl: one JSON object per evaluation


def read_json(path: Path) -> dict[str, Any] | None:
    """Read a small JSON object written atomically by the other process; None if absent or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
