"""Multi-worker kill storm: SIGKILL a random worker of a `trainer --workers 2` job (the chief included) again
and again, often inside a save, with an evaluator watching; each relaunch must resume from exactly the
chief's last committed checkpoint.

Used by `tests/fault/test_kill_storm_multiworker.py` (2 kills) and `make soak` (50 kills, then a worker
that hangs instead of dying):

    python -m tests.fault.mw_storm --kills 50
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.storage import open_storage
from tests.fault import storm
from tests.fault.storm import REPO, _leftovers, _staging, _state_mtime
from tests.helpers import committed_step


class Job:
    """A running `trainer --workers N` job whose stdout and stderr lines are collected as they come."""

    def __init__(self, args: list[str], *, workers: int = 2, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "--workers", str(workers), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._collect, args=(s, lines), daemon=True)
                         for s, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for thread in self._threads:
            thread.start()

    def _collect(self, stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, start: str, *parts: str, timeout: float = 120) -> str | None:
        """The first stdout line that starts with `start` and holds `parts`, waiting for it; None when the job
        ended or time ran out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.out if line.startswith(start) and all(p in line for p in parts)),
                             None)
                if found is not None or self.proc.poll() is not None or time.monotonic() > deadline:
                    return found
                self._changed.wait(0.2)

    def finish(self, timeout: float = 120) -> int:
        """Wait for the job to end (kill it after `timeout`, a hang) and for its last lines; return its code."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the job did not end within {timeout} s") from None
        for thread in self._threads:
            thread.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code

    def worker_pids(self) -> dict[int, int]:
        """The worker processes' pids by worker index (read from their TF_CONFIG)."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (entry / "environ").read_bytes().split(b"\0") if ppid == self.proc.pid else []
            except (OSError, IndexError, ValueError):
                continue
            for var in env:
                if var.startswith(b"TF_CONFIG="):
                    found[json.loads(var[len(b"TF_CONFIG="):])["task"]["index"]] = int(entry.name)
        return found


@dataclass
class StormStats:
    kills: int = 0
    chief_kills: int = 0
    in_save: int = 0  # kills made while the chief's TF staging folder existed
    resumes_verified: int = 0
    lost_lines_verified: int = 0  # launcher lines naming the killed worker
    evaluations: int = 0
    broken_reads: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"kills={self.kills} chief_kills={self.chief_kills} saves_interrupted={self.in_save} "
                f"resumes_verified={self.resumes_verified} lost_lines_verified={self.lost_lines_verified} "
                f"evaluations={self.evaluations} broken_reads={self.broken_reads}")


def _job(workdir: Path, data_dir: Path, extra: tuple[str, ...] = ()) -> Job:
    return Job(["--workdir", str(workdir), "--data-dir", str(data_dir), "--model", "mlp", "--steps", "100000000",
                "--save-every", "10", "--steps-per-loop", "5", "--keep", "3", "--progress", "plain",
                "--log-every", "100000000", "--collective-timeout", "60", *extra])


def _kill_one(job: Job, workdir: Path, rng: random.Random, stats: StormStats) -> None:
    """Once the job has committed a checkpoint, SIGKILL a random worker: inside a save when aiming at one."""
    launched = _state_mtime(workdir)
    deadline = time.monotonic() + 120
    while _state_mtime(workdir) == launched and time.monotonic() < deadline and job.proc.poll() is None:
        time.sleep(0.01)
    if rng.random() < 0.5:
        while not _staging(workdir) and time.monotonic() < deadline and job.proc.poll() is None:
            time.sleep(0.0005)
    else:
        time.sleep(rng.uniform(0.0, 0.5))
    victim = rng.randrange(2)
    stats.in_save += _staging(workdir)
    pids = job.worker_pids()
    if victim not in pids:
        stats.problems.append(f"worker {victim} was not running when it was to be killed (job code {job.proc.poll()})")
        return
    os.kill(pids[victim], signal.SIGKILL)
    stats.kills += 1
    stats.chief_kills += victim == 0
    code = job.finish()
    want = f"trainer: error: worker {victim} was lost (killed by SIGKILL); ended the other workers"
    if code == 128 + signal.SIGKILL and job.err and job.err[-1] == want:
        stats.lost_lines_verified += 1
    else:
        stats.problems.append(f"after killing worker {victim}: exit {code}, last line {job.err[-1:]!r}")


def run_storm(kills: int, data_dir: Path, workdir: Path, seed: int = 0) -> StormStats:
    """Run the storm and return its figures; problems found are listed in `stats.problems`."""
    rng = random.Random(seed)
    stats = StormStats()
    evaluator = storm.start_evaluator(workdir, data_dir)
    try:
        expected: int | None = None
        while stats.kills < kills and len(stats.problems) < 3:
            job = _start(workdir, data_dir, expected, stats)
            _kill_one(job, workdir, rng, stats)
            expected = committed_step(open_storage(workdir))
        _last_clean_start(_start(workdir, data_dir, expected, stats), workdir, stats)
    finally:
        storm.stop_evaluator(evaluator, stats.problems)
    rows = [json.loads(line) for line in (workdir / "eval" / "results.jsonl").read_text().splitlines()]
    stats.evaluations = sum(r["status"] == "ok" for r in rows)
    stats.broken_reads = sum(r["status"] == "error" for r in rows)
    return stats


def _start(workdir: Path, data_dir: Path, expected: int | None, stats: StormStats) -> Job:
    """Launch the job and check that its chief starts from exactly the last committed checkpoint."""
    job = _job(workdir, data_dir)
    want = "starting fresh" if expected is None else f"resumed from model-{expected} (step {expected})"
    first = job.wait_for("[worker 0] starting fresh" if expected is None else "[worker 0] resumed from")
    if first == f"[worker 0] {want}":
        stats.resumes_verified += expected is not None
    else:
        stats.problems.append(f"expected {want!r}, got {first!r}")
    return job


def _last_clean_start(job: Job, workdir: Path, stats: StormStats) -> None:
    """The last start, stopped by SIGTERM: it removes the last kill's leftovers and exits 0."""
    job.proc.send_signal(signal.SIGTERM)
    code = job.finish()
    if code != 0:
        stats.problems.append(f"the last start exited {code} on SIGTERM: {job.err[-3:]}")
    if _leftovers(workdir):
        stats.problems.append(f"leftovers after a clean start: {sorted(p.name for p in workdir.iterdir())}")


def hung_worker(data_dir: Path, workdir: Path) -> list[str]:
    """SIGSTOP worker 1 of a job with a 5 s collective timeout: the job must end, naming it; return problems."""
    job = _job(workdir, data_dir, ("--collective-timeout", "5"))
    if job.wait_for("[worker 0] starting fresh") is None:
        return [f"the job did not start: {job.err[-3:]}"]
    os.kill(job.worker_pids()[1], signal.SIGSTOP)
    code = job.finish(timeout=60)
    want = "trainer: error: worker 1 stopped answering (worker 0 lost contact, exit code 6); ended worker 1"
    return [] if code == 6 and job.err[-1:] == [want] else [f"hung worker 1: exit {code}, last line {job.err[-1:]}"]


def soak(kills: int, data_dir: Path, workdir: Path, seed: int = 0) -> StormStats:
    """`make soak`: the storm, then a hung (not killed) worker."""
    stats = run_storm(kills, data_dir, workdir, seed=seed)
    stats.problems += hung_worker(data_dir, workdir.parent / "hung")
    return stats


if __name__ == "__main__":
    sys.exit(storm.main(soak, 50, __doc__))
