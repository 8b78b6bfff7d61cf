"""A bucket workdir's watching evaluator when nothing happens: one metadata request per poll, no rescans.

The evaluator runs here (`run_watch`) against the S3 server through a counting proxy on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.run.ledger import Ledger
from common.signals import StopRequest
from common.storage import open_storage
from common.storage.objectstore import ObjectStorage, Poller, open_bucket
from common.storage.paths import BucketPath
from evaluator import loop
from evaluator.config import EvalConfig
from tests.cloud import FlakyProxy, Servers
from tests.helpers import Spy, run_trainer_cli

pytestmark = pytest.mark.cloud


def _train(workdir: str, tiny_data: Path, steps: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_trainer_cli(["--workdir", workdir, "--data-dir", str(tiny_data), "--model", "softmax",
                                    "--steps", str(steps), "--save-every", "1", "--steps-per-loop", "1",
                                    "--keep", "0"], capsys)
    assert code == 0, err


def _until(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.01)


class Watcher:
    """The real watch loop in a thread, its poller and its scans counted, its requests through `proxy`."""

    def __init__(self, cfg: EvalConfig, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pollers: list[Poller] = []
        self.scans = 0
        real_watch, real_scan = ObjectStorage.watch, loop._scan

        def watch(storage: ObjectStorage, *args: Any, **kwargs: Any) -> Poller:
            self.pollers.append(real_watch(storage, *args, **kwargs))
            return self.pollers[-1]

        def scan(session: Any) -> Any:
            self.scans += 1
            return real_scan(session)

        monkeypatch.setattr(ObjectStorage, "watch", watch)
        monkeypatch.setattr(loop, "_scan", scan)
        self.display, self.stop = Spy(), StopRequest()
        self.thread = threading.Thread(target=loop.run_watch, args=(cfg, self.display, self.stop), daemon=True)

    @property
    def polls(self) -> int:
        return self.pollers[0].polls if self.pollers else 0

    def __enter__(self) -> Watcher:
        self.thread.start()
        _until(lambda: self.scans >= 1 and len(self.display.statuses) >= 2, "the first scan")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set("test")
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


@contextlib.contextmanager
def proxied(cloud: Servers, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyProxy]:
    """A pass-through proxy in front of the S3 server, which this process's clients use meanwhile."""
    with FlakyProxy(cloud.s3, failures=0) as proxy, monkeypatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", proxy.url)
        open_bucket.cache_clear()  # the clients opened before go straight to the server
        try:
            yield proxy
        finally:
            open_bucket.cache_clear()


def _idle_requests_per_poll(cfg: EvalConfig, cloud: Servers, monkeypatch: pytest.MonkeyPatch,
                            polls: int = 10) -> float:
    with proxied(cloud, monkeypatch) as proxy, monkeypatch.context() as patch, Watcher(cfg, patch) as watcher:
        _until(lambda: watcher.polls >= 1, "the first poll")  # after the first scan, which found nothing new
        first = watcher.polls
        _until(lambda: watcher.polls > first, "a poll")  # right after a poll: the next is poll_secs away
        start_polls, start_seen, scans = watcher.polls, proxy.seen, watcher.scans
        _until(lambda: watcher.polls >= start_polls + polls, f"{polls} polls")
        seen, counted = proxy.seen - start_seen, watcher.polls - start_polls
        assert watcher.scans == scans  # no rescan without a notice
    return seen / counted


def test_an_idle_evaluator_makes_one_request_per_poll_whatever_the_checkpoints(
        cloud: Servers, tiny_data: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = f"s3://{cloud.new_bucket('s3')}/run"
    # --rescan-secs of an hour: within the window the header is not refreshed either, only polls happen.
    cfg = EvalConfig(workdir=BucketPath(workdir), data_dir=str(tiny_data), poll_secs=0.2, rescan_secs=3600.0)
    per_poll = {}
    for steps in (2, 8):
        _train(workdir, tiny_data, steps, capsys)
        loop.run_once(cfg)  # everything evaluated: the watch below has nothing to do
        per_poll[steps] = _idle_requests_per_poll(cfg, cloud, monkeypatch)
    assert len(Ledger(open_storage(BucketPath(workdir))).read()) == 8
    # One HEAD of the state file per poll (one more may be in flight at either end of the window, and the
    # evaluator's registration is renewed, a GET and a PUT, every 200 s: that may fall in the window too).
    assert all(1.0 <= v <= 1.0 + 3 / 10 for v in per_poll.values()), per_poll


def test_timed_refreshes_of_a_bucket_workdir_do_not_rescan_it(
        cloud: Servers, tiny_data: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = f"s3://{cloud.new_bucket('s3')}/run"
    _train(workdir, tiny_data, 3, capsys)
    cfg = EvalConfig(workdir=BucketPath(workdir), data_dir=str(tiny_data), poll_secs=3600.0, rescan_secs=0.1)
    with Watcher(cfg, monkeypatch) as watcher:
        _until(lambda: len(Ledger(open_storage(BucketPath(workdir))).read()) == 3
               and watcher.display.statuses[-1]["state"] == "watching", "the three evaluations")
        shown, scans = len(watcher.display.statuses), watcher.scans
        _until(lambda: len(watcher.display.statuses) >= shown + 5, "five timed refreshes of the header")
        assert watcher.scans == scans
        # A commit is noticed by the poller only: here it polls once an hour, so nothing is evaluated.
        _train(workdir, tiny_data, 4, capsys)
        _until(lambda: len(watcher.display.statuses) >= shown + 10, "five more refreshes")
        assert len(Ledger(open_storage(BucketPath(workdir))).read()) == 3 and watcher.scans == scans
