"""Evaluator kill storm: three evaluators share a workdir's checkpoints; a random one is SIGKILLed again and
again, most often in the middle of an evaluation, and started again. Every checkpoint must end up evaluated
exactly once, none lost, and eval/best must be the maximum.

Run by `make soak` (20 kills) and by hand:

    python -m tests.fault.eval_storm --kills 20
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common.layout import CLAIMS_DIR, EVAL_DIR
from common.run.ledger import Ledger
from common.run.workdir import Workdir
from common.storage import open_storage
from tests.fault.storm import main
from tests.helpers import REPO

NAMES = ("a", "b", "c")
CHECKPOINTS = 40  # model-5 ... model-200
PAUSE_SECS = "0.4"  # each evaluation of the slow model takes this long more: a kill often lands inside one


@dataclass
class StormStats:
    kills: int = 0
    mid_evaluation: int = 0  # kills of an evaluator that held a claim
    evaluations: int = 0
    problems: list[str] = field(default_factory=list)
    broken_reads: int = 0  # unused here; `main` reads it

    def line(self) -> str:
        return (f"kills={self.kills} mid_evaluation={self.mid_evaluation} evaluations={self.evaluations} "
                f"problems={len(self.problems)}")


def _train(workdir: Path, data_dir: Path) -> None:
    subprocess.run([sys.executable, "-m", "trainer.cli", "--workdir", str(workdir), "--data-dir", str(data_dir),
                    "--model", "tests.byo_models:slow_eval", "--steps", str(5 * CHECKPOINTS), "--save-every", "5",
                    "--steps-per-loop", "5", "--keep", "0", "--progress", "plain"],
                   check=True, cwd=REPO, capture_output=True, text=True)


def _evaluator(workdir: Path, data_dir: Path, name: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "evaluator.cli", "--workdir", str(workdir), "--data-dir", str(data_dir),
           "--name", name, "--exit-when-done", "--progress", "plain"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=os.environ | {"SLOW_EVAL_SECS": PAUSE_SECS})


def _holds_claim(workdir: Path, name: str) -> bool:
    folder = workdir / EVAL_DIR / CLAIMS_DIR
    try:
        return any(p.read_text("utf-8", "replace").strip() == name for p in folder.iterdir())
    except OSError:
        return False


def run_storm(kills: int, data_dir: Path, workdir: Path, seed: int = 0) -> StormStats:
    """Train CHECKPOINTS checkpoints, then evaluate them with three evaluators under `kills` SIGKILLs."""
    rng = random.Random(seed)
    stats = StormStats()
    _train(workdir, data_dir)
    procs = {name: _evaluator(workdir, data_dir, name) for name in NAMES}
    try:
        while stats.kills < kills and any(p.poll() is None for p in procs.values()):
            name = rng.choice(NAMES)
            # Mostly in the middle of an evaluation: once it holds a claim (a restarted one first imports TF).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not _holds_claim(workdir, name) and procs[name].poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            if procs[name].poll() is not None:
                continue
            stats.mid_evaluation += _holds_claim(workdir, name)
            procs[name].send_signal(signal.SIGKILL)
            procs[name].communicate()
            stats.kills += 1
            procs[name] = _evaluator(workdir, data_dir, name)
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                stats.problems.append(f"evaluator {name} exited {proc.returncode}: {err.strip()[-300:]}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    _check(workdir, stats)
    return stats


def _check(workdir: Path, stats: StormStats) -> None:
    storage = open_storage(workdir)
    rows = [r for r in Ledger(storage).read() if r.get("split") == "validation" and r.get("weights") == "ema"]
    stats.evaluations = len(rows)
    counts = Counter(r["checkpoint"] for r in rows)
    expected = {f"model-{5 * i}" for i in range(1, CHECKPOINTS + 1)}
    stats.problems += [f"{name} has {counts[name]} rows" for name in sorted(expected) if counts[name] != 1]
    stats.problems += [f"row of {r['checkpoint']}: {r['status']} {r.get('reason', '')}" for r in rows
                       if r["status"] != "ok"]
    best = Workdir(storage).best()
    top = max((r for r in rows if r["status"] == "ok"), key=lambda r: (r["accuracy"], -r["step"]), default=None)
    if top is None or best is None or (best.checkpoint, best.accuracy) != (top["checkpoint"], top["accuracy"]):
        stats.problems.append(f"best is {best}, the ledger's maximum {top}")
    elif not (workdir / EVAL_DIR / "best" / f"{best.checkpoint}.index").exists():
        stats.problems.append("the best folder lost its files")
    if storage.names(f"{EVAL_DIR}/{CLAIMS_DIR}"):
        stats.problems.append(f"claims left: {storage.names(f'{EVAL_DIR}/{CLAIMS_DIR}')}")


if __name__ == "__main__":
    sys.exit(main(run_storm, default_kills=20, description=__doc__))
