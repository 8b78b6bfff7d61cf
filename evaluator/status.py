"""The header above the live table: the workdir, the run, the trainer's status, the backlog and warnings."""

from __future__ import annotations

import time
from typing import Any

from common.run.ledger import FAILED, Ledger
from common.run.protocol import TrainerHeartbeat, TrainingDone
from common.run.spec import RunSpec
from common.storage import Storage
from evaluator.config import EvalConfig
from evaluator.rows import Row
from evaluator.sets import Selection


def trainer_status(storage: Storage, silent_secs: float) -> tuple[str, str]:
    """A line on the trainer (from done.json and heartbeat.json), and a warning if it went silent."""
    done = TrainingDone.read(storage)
    if done is not None:
        return f"finished at step {done.step}", ""
    beat = TrainerHeartbeat.read(storage)
    if beat is None:
        return "not seen yet", ""
    age = time.time() - float(beat.time or 0)
    if beat.state == "stopped":
        return f"stopped (last step {beat.step})", ""
    line = f"step {beat.step}/{beat.total_steps}, {float(beat.steps_per_sec or 0):.1f} steps/s, {age:.0f}s ago"
    return line, (f"trainer silent for {age:.0f}s" if age > silent_secs else "")


def header(cfg: EvalConfig, storage: Storage, spec: RunSpec | None, backlog: int, *, problem: str,
           warnings: list[str]) -> dict[str, Any]:
    """The header's fields; the current `problem` and a silent trainer are warned of before `warnings`."""
    trainer, silent = trainer_status(storage, cfg.silent_secs)
    run, names = "", list(spec.class_names) if spec else []
    evaluated = f"{sets_line(cfg)}  weights={cfg.weights}"
    if spec is not None:
        run = f"{spec.dataset}/{spec.model}  {evaluated}"
    elif cfg.graph is not None:
        run = f"{cfg.graph.dataset}/TF1 graph {cfg.graph.input} -> {cfg.graph.output}  {evaluated}"
        names = list(cfg.graph.class_names())
        if trainer == "not seen yet":  # a foreign trainer writes no heartbeat
            trainer = "not this project's (a TF1 Saver run: no heartbeat to show)"
    elif cfg.foreign is not None:
        run = f"{cfg.foreign.dataset}/{cfg.foreign.model} (another training loop's checkpoints)  {evaluated}"
        names = list(cfg.foreign.info.class_names)
        if trainer == "not seen yet":
            trainer = "not this project's (another training loop: no heartbeat to show)"
    return {"workdir": str(cfg.workdir), "run": run, "trainer": trainer, "backlog": backlog,
            "warnings": [w for w in (problem, silent) if w] + warnings,
            "class_names": names, "per_class": cfg.per_class}


def sets_line(cfg: EvalConfig) -> str:
    """The header's word on the sets: which are evaluated, which one decides and which are reported only."""
    if len(cfg.set_names) == 1 and cfg.selection in (None, Selection()):
        return f"split={cfg.set_names[0]}"
    if cfg.selection is None:
        return f"sets={','.join(cfg.set_names)} (reported only: no --select, and validation is not evaluated)"
    others = [n for n in cfg.set_names if n != cfg.selection.set]
    reported = f"; reported only: {', '.join(others)}" if others else ""
    return f"sets={','.join(cfg.set_names)} (best, patience and retention by {cfg.selection.describe()}{reported})"


def result_warnings(rows: list[Row], ledger: Ledger, *, best_problem: str) -> list[str]:
    """Warnings about what the ledger holds, and why eval/best lags behind it (`best_problem`)."""
    warnings = []
    errors = [r.checkpoint for r in rows if r.status == "error"]
    if errors:
        warnings.append(f"{len(errors)} checkpoint(s) could not be read: {', '.join(errors[-3:])} "
                        "(reason in the status column)")
    failed = [r for r in rows if r.status == FAILED]
    if failed:
        warnings.append(f"{len(failed)} checkpoint(s) not evaluated because of a problem here, not in the "
                        f"checkpoint ({failed[-1].reason}); evaluated again at the next scan or run")
    if best_problem:
        warnings.append(best_problem)
    if ledger.skipped:
        warnings.append(f"skipped {ledger.skipped} unreadable line(s) of {ledger.where}")
    return warnings
