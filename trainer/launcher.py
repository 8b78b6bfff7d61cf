"""`trainer --workers N --evaluators M ...`: run a job of local processes, as a cluster manager would.

Each worker is `trainer ... --strategy multi-worker` with its own `TF_CONFIG` naming N free
127.0.0.1 ports; each of the M evaluators is `evaluator --workdir ...` with the same cluster and an
`evaluator` task (as a TFJob's Evaluator replica gets it), which makes it evaluate until the
trainer is done. Without --workers the trainer is one process of its own. The launcher prints each
process's lines prefixed with its name, forwards SIGINT and SIGTERM to every process, and watches
them: when one fails or is lost, it ends the others at once (a job cannot go on without one of its
workers) and exits with that process's code. This module imports no TensorFlow: the launcher only
starts and watches processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Sequence
from typing import IO, Any

from common.cluster import EVALUATOR, tf_config
from common.errors import EXIT_WORKER_LOST, UsageError

POLL_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held open together while chosen, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _pump(stream: IO[str], out: IO[str], prefix: str, lock: threading.Lock) -> None:
    """Copy `stream` line by line to `out`, each line prefixed."""
    for line in stream:
        with lock:
            try:
                out.write(prefix + line)
                out.flush()
            except (BrokenPipeError, ValueError):  # a closed terminal or pipe must not stop the job
                pass


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the launcher dies, so that a killed launcher leaves no orphan workers."""
    with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere the workers outlive a killed launcher
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclasses.dataclass(frozen=True)
class Member:
    """One process of the job."""

    name: str  # in the prefix of its lines and in messages: `worker 0`, `trainer`, `evaluator 1`
    command: list[str]
    tf_config: str | None  # its TF_CONFIG; None: none (a trainer of its own)


def members(workers: int, argv: Sequence[str], *, evaluators: int = 0,
            evaluator_argv: Sequence[str] = ()) -> list[Member]:
    """The job's processes: the trainer (N workers of one cluster, or one process) and M evaluator tasks."""
    ports = free_ports(workers + evaluators)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports[:workers]]} if workers else {}
    if evaluators:  # addresses, as a job spec gives them; an evaluator task serves none
        cluster[EVALUATOR] = [f"127.0.0.1:{p}" for p in ports[workers:]]
    trainer = [sys.executable, "-m", "trainer.cli", *argv, "--workers", "0", "--evaluators", "0"]
    found = [Member(f"worker {i}", [*trainer, "--strategy", "multi-worker"], tf_config(cluster, "worker", i))
             for i in range(workers)] or [Member("trainer", trainer, None)]
    evaluator = [sys.executable, "-m", "evaluator.cli", *evaluator_argv]
    return found + [Member(f"evaluator {j}", evaluator, tf_config(cluster, EVALUATOR, j)) for j in range(evaluators)]


class Job:
    """The processes of one job, started together and ended together."""

    def __init__(self, started: Sequence[Member]) -> None:
        self.members = list(started)
        self.procs: list[subprocess.Popen[str]] = []
        self.forwarded: set[int] = set()  # minus the signals forwarded: a process's return code when one ended it
        self.threads: list[threading.Thread] = []
        for member in self.members:
            env = os.environ | {"PYTHONUNBUFFERED": "1"}
            env.pop("TF_CONFIG", None)
            env |= {"TF_CONFIG": member.tf_config} if member.tf_config else {}
            # A session of its own: a Ctrl-C on the terminal reaches the launcher, which forwards it once.
            self.procs.append(subprocess.Popen(
                member.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                start_new_session=True, preexec_fn=_die_with_parent))
        lock = threading.Lock()  # the pumps start after every Popen: preexec_fn is unsafe beside threads
        for member, proc in zip(self.members, self.procs, strict=True):
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                thread = threading.Thread(target=_pump, args=(stream, out, f"[{member.name}] ", lock), daemon=True)
                thread.start()
                self.threads.append(thread)

    def signal_all(self, signum: int) -> None:
        self.forwarded.add(-signum)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def wait(self) -> tuple[int, str | None]:
        """Wait until every worker ended, or one failed; return the exit code and the line that says why."""
        while True:
            codes = {i: p.poll() for i, p in enumerate(self.procs)}
            failed = [(i, c) for i, c in codes.items() if c is not None and c != 0]
            if failed:
                names = [m.name for m in self.members]
                return _first_failure(failed, running=self._end_all(), forwarded=self.forwarded, names=names)
            if all(c == 0 for c in codes.values()):
                return 0, None
            time.sleep(POLL_SECONDS)

    def _end_all(self) -> list[int]:
        """SIGKILL the workers still running (their collectives would fail or hang); return their indices."""
        running = [i for i, p in enumerate(self.procs) if p.poll() is None]
        for i in running:
            self.procs[i].kill()
        self.close()
        return running

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for thread in self.threads:
            thread.join(timeout=5)


def _first_failure(failed: list[tuple[int, int]], *, running: list[int], forwarded: Collection[int] = (),
                   names: Sequence[str] = ()) -> tuple[int, str]:
    """The code and line of the failure to report: a worker that died or failed by itself before one
    that only lost contact with it (both can end within one poll). `running`: the processes that were
    still running, and were ended; when a worker lost contact, they are the ones that stopped answering.
    `names`: each process's name (by default `worker <index>`)."""
    def name(index: int) -> str:
        return names[index] if index < len(names) else f"worker {index}"

    i, code = min(failed, key=lambda f: (f[1] == EXIT_WORKER_LOST, f[0]))
    ended = ", ".join(name(r) for r in running)
    if code in forwarded:  # a process that had not yet (or no longer) routed signals to a stop at a safe point
        what = f"{name(i)} was ended by the {signal.Signals(-code).name} forwarded to it, outside training"
        code = 128 - code
    elif code < 0:
        what = f"{name(i)} was lost (killed by {signal.Signals(-code).name})"
        code = 128 - code
    elif code == EXIT_WORKER_LOST and running:
        return code, f"{ended} stopped answering ({name(i)} lost contact, exit code {code}); ended {ended}"
    elif code == EXIT_WORKER_LOST:
        what = f"{name(i)} lost contact with another worker (exit code {code})"
    else:
        what = f"{name(i)} failed (exit code {code})"
    others = "processes" if any(not name(r).startswith("worker") for r in running) else "workers"
    return code, what + (f"; ended the other {others}" if running else "")


def launch(workers: int, argv: Sequence[str], *, evaluators: int = 0, evaluator_argv: Sequence[str] = ()) -> int:
    """Run `trainer argv` as a job of `workers` local processes (or one) and `evaluators`; return its exit code."""
    if workers < 0 or evaluators < 0 or workers + evaluators < 1:
        raise UsageError(f"--workers ({workers}) and --evaluators ({evaluators}) must be positive integers")
    started = members(workers, argv, evaluators=evaluators, evaluator_argv=evaluator_argv)
    if workers:
        addresses = json.loads(started[0].tf_config or "{}")["cluster"]["worker"]
        print(f"launching {workers} worker{'s' * (workers != 1)} of one multi-worker job on {', '.join(addresses)}; "
              "worker 0 is the chief", flush=True)
    if evaluators:
        print(f"launching {evaluators} evaluator{'s' * (evaluators != 1)} (TF_CONFIG evaluator tasks) on the workdir",
              flush=True)
    job = Job(started)

    def forward(signum: int, _frame: Any) -> None:
        job.signal_all(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code, why = job.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        job.close()
    if why:
        print(f"trainer: error: {why}", file=sys.stderr, flush=True)
    return code
