"""Kill storm: SIGKILL a real trainer again and again, many times inside a save, with an evaluator watching.

The trainer runs with `--save-mode async` (the default; `--save-mode sync` for the other), so a
kill aimed at a save lands while the writer thread writes the snapshot, the training thread
already training on. Used by `tests/fault/test_kill_storm.py` (5 kills) and `make soak` (300 kills):

    python -m tests.fault.storm --kills 300
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.storage import open_storage
from tests.helpers import REPO, committed_step


@dataclass
class StormStats:
    kills: int = 0
    in_save: int = 0  # kills made while TF's <name>_temp staging folder existed (async: the writer was writing)
    saves_logged: dict[str, int] = field(default_factory=dict)  # "saved" log lines of the killed trainers, by mode
    resumes_verified: int = 0
    evaluations: int = 0
    broken_reads: int = 0  # ledger rows with status error (a read of a partial checkpoint)
    leftovers_max: int = 0  # temp files or folders seen at once after a kill
    steps_lost: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        lost = self.steps_lost or [0]
        return (f"kills={self.kills} saves_interrupted={self.in_save} resumes_verified={self.resumes_verified} "
                f"evaluations={self.evaluations} broken_reads={self.broken_reads} "
                f"steps_lost_max={max(lost)} steps_lost_mean={statistics.mean(lost):.1f} "
                f"saves_logged={self.saves_logged}")


def _trainer(workdir: Path, data_dir: Path, save_mode: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "trainer.cli", "--workdir", str(workdir), "--data-dir", str(data_dir),
           "--model", "mlp", "--steps", "100000000", "--save-every", "10", "--steps-per-loop", "5", "--keep", "3",
           "--progress", "plain", "--log-every", "100000000", "--save-mode", save_mode]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _staging(workdir: Path) -> bool:
    return any(p.name.endswith("_temp") for p in workdir.glob("model-*_temp"))


def _leftovers(workdir: Path) -> int:
    return sum(1 for p in workdir.iterdir() if p.name.endswith("_temp") or ".tmp" in p.name)


def _kill_one(proc: subprocess.Popen[str], workdir: Path, rng: random.Random, stats: StormStats) -> int:
    """Wait for training to run, then kill: inside a save when aiming at it, else at a random moment."""
    aim_at_save = rng.random() < 0.6
    deadline = time.monotonic() + 60
    launched_state = _state_mtime(workdir)
    started = False
    while time.monotonic() < deadline and proc.poll() is None:
        if not started:  # let this run commit at least one checkpoint, so that the storm makes progress
            started = _state_mtime(workdir) != launched_state
            time.sleep(0.002)
            continue
        if aim_at_save:
            if _staging(workdir):
                break
            time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, 0.5))
            break
    saving = [int(p.name[len("model-"):-len("_temp")]) for p in workdir.glob("model-*_temp")]
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()  # reaps it and closes its pipes
    for line in out.splitlines():
        if " trainer saved " in line and " mode=" in line:
            mode = line.split(" mode=")[1].split()[0]
            stats.saves_logged[mode] = stats.saves_logged.get(mode, 0) + 1
    stats.kills += 1
    stats.in_save += bool(saving)
    return max(saving, default=0)


def _state_mtime(workdir: Path) -> int:
    try:
        return (workdir / "checkpoint").stat().st_mtime_ns
    except OSError:
        return 0


def run_storm(kills: int, data_dir: Path, workdir: Path, seed: int = 0, save_mode: str = "async") -> StormStats:
    """Run the storm and return its figures; problems found are listed in `stats.problems`."""
    rng = random.Random(seed)
    stats = StormStats()
    evaluator = start_evaluator(workdir, data_dir)
    try:
        expected: int | None = None
        for _ in range(kills):
            proc = _trainer(workdir, data_dir, save_mode)
            assert proc.stdout is not None
            first = proc.stdout.readline().strip()
            want = "starting fresh" if expected is None else f"resumed from model-{expected} (step {expected})"
            if first == want:
                stats.resumes_verified += expected is not None
            else:
                stats.problems.append(f"expected {want!r}, got {first!r}")
            saving = _kill_one(proc, workdir, rng, stats)
            stats.leftovers_max = max(stats.leftovers_max, _leftovers(workdir))
            reached = max(_heartbeat_step(workdir) or 0, saving)  # a lower bound of the step at the kill
            expected = committed_step(open_storage(workdir))
            if expected is not None:
                stats.steps_lost.append(max(0, reached - expected))
        # One last clean start removes the leftovers of the last kill.
        proc = _trainer(workdir, data_dir, save_mode)
        assert proc.stdout is not None
        proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        if _leftovers(workdir):
            stats.problems.append(f"leftovers after a clean start: {sorted(p.name for p in workdir.iterdir())}")
    finally:
        stop_evaluator(evaluator, stats.problems)
    rows = [json.loads(line) for line in (workdir / "eval" / "results.jsonl").read_text().splitlines()]
    stats.evaluations = sum(r["status"] == "ok" for r in rows)
    stats.broken_reads = sum(r["status"] == "error" for r in rows)
    keys = [(r["checkpoint"], r["committed"], r["split"], r["weights"]) for r in rows]
    if len(keys) != len(set(keys)):
        stats.problems.append("duplicate ledger rows")
    return stats


def start_evaluator(workdir: Path, data_dir: Path) -> subprocess.Popen[str]:
    """A real evaluator watching `workdir`, rescanning every second."""
    return subprocess.Popen(
        [sys.executable, "-m", "evaluator.cli", "--workdir", str(workdir), "--data-dir", str(data_dir),
         "--progress", "plain", "--rescan-secs", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        cwd=REPO)


def stop_evaluator(evaluator: subprocess.Popen[str], problems: list[str]) -> None:
    """SIGTERM the evaluator; a hang or a non-zero exit is added to `problems`."""
    evaluator.send_signal(signal.SIGTERM)
    try:
        _, err = evaluator.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        evaluator.kill()
        err = "evaluator did not stop on SIGTERM"
    if evaluator.returncode != 0:
        problems.append(f"evaluator exited {evaluator.returncode}: {err[-500:]}")


def _heartbeat_step(workdir: Path) -> int | None:
    try:
        return int(json.loads((workdir / "heartbeat.json").read_text()).get("step"))
    except (OSError, ValueError, TypeError):
        return None


def main(run: Callable[..., Any] | None = None, default_kills: int = 300, description: str | None = __doc__) -> int:
    """Run a storm (this one, or `run` with the same signature) on tiny data; print its problems and figures."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--kills", type=int, default=default_kills)
    p.add_argument("--seed", type=int, default=0)
    if run is None:
        p.add_argument("--save-mode", choices=["sync", "async"], default="async", help="the trainer's (default async)")
    args = p.parse_args()
    from common.tfenv import quiet_import_tensorflow

    quiet_import_tensorflow()
    from tests.helpers import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "data")
        workdir = Path(tmp) / "run"
        stats = (run(args.kills, data, workdir, seed=args.seed) if run is not None
                 else run_storm(args.kills, data, workdir, seed=args.seed, save_mode=args.save_mode))
    for problem in stats.problems:
        print(f"problem: {problem}")
    print(stats.line())
    return 1 if stats.problems or stats.broken_reads else 0


if __name__ == "__main__":
    sys.exit(main())
