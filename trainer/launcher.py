"""`trainer --workers N ...`: run a multi-worker job of N local processes, as a cluster manager would.

Each worker is `trainer ... --strategy multi-worker` with its own `TF_CONFIG` naming N free
127.0.0.1 ports. The launcher prints each worker's lines prefixed with its index, forwards SIGINT
and SIGTERM to every worker, and watches them: when one fails or is lost, it ends the others at
once (a job cannot go on without one of its workers) and exits with that worker's code. This
module imports no TensorFlow: the launcher only starts and watches processes.
"""

from __future__ import annotations

import contextlib
import ctypes
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


def tf_config(addresses: Sequence[str], index: int) -> str:
    """The `TF_CONFIG` of worker `index` in a cluster of `addresses` (worker 0 is the chief)."""
    return json.dumps({"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}})


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


class Job:
    """N worker processes started together and ended together."""

    def __init__(self, workers: int, argv: Sequence[str]) -> None:
        addresses = [f"127.0.0.1:{port}" for port in free_ports(workers)]
        command = [sys.executable, "-m", "trainer.cli", *argv, "--workers", "0", "--strategy", "multi-worker"]
        print(f"launching {workers} worker{'s' * (workers != 1)} of one multi-worker job on {', '.join(addresses)}; "
              "worker 0 is the chief", flush=True)
        self.procs: list[subprocess.Popen[str]] = []
        self.forwarded: set[int] = set()  # minus the signals forwarded: a worker's return code when one ended it
        self.threads: list[threading.Thread] = []
        for i in range(workers):
            env = os.environ | {"TF_CONFIG": tf_config(addresses, i), "PYTHONUNBUFFERED": "1"}
            # A session of its own: a Ctrl-C on the terminal reaches the launcher, which forwards it once.
            self.procs.append(subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                start_new_session=True, preexec_fn=_die_with_parent))
        lock = threading.Lock()  # the pumps start after every Popen: preexec_fn is unsafe beside threads
        for i, proc in enumerate(self.procs):
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                thread = threading.Thread(target=_pump, args=(stream, out, f"[worker {i}] ", lock), daemon=True)
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
                return _first_failure(failed, running=self._end_all(), forwarded=self.forwarded)
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


def _first_failure(failed: list[tuple[int, int]], *, running: list[int],
                   forwarded: Collection[int] = ()) -> tuple[int, str]:
    """The code and line of the failure to report: a worker that died or failed by itself before one
    that only lost contact with it (both can end within one poll). `running`: the workers that were
    still running, and were ended; when a worker lost contact, they are the ones that stopped answering."""
    i, code = min(failed, key=lambda f: (f[1] == EXIT_WORKER_LOST, f[0]))
    names = ", ".join(f"worker {r}" for r in running)
    if code in forwarded:  # a worker that had not yet (or no longer) routed signals to a stop at a safe point
        what = f"worker {i} was ended by the {signal.Signals(-code).name} forwarded to it, outside training"
        code = 128 - code
    elif code < 0:
        what = f"worker {i} was lost (killed by {signal.Signals(-code).name})"
        code = 128 - code
    elif code == EXIT_WORKER_LOST and running:
        return code, f"{names} stopped answering (worker {i} lost contact, exit code {code}); ended {names}"
    elif code == EXIT_WORKER_LOST:
        what = f"worker {i} lost contact with another worker (exit code {code})"
    else:
        what = f"worker {i} failed (exit code {code})"
    return code, what + ("; ended the other workers" if running else "")


def launch(workers: int, argv: Sequence[str]) -> int:
    """Run `trainer argv` as a job of `workers` local processes; return the job's exit code."""
    if workers < 1:
        raise UsageError(f"--workers ({workers}) must be a positive integer")
    job = Job(workers, argv)

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
