"""The actions the outer loop runs after each call of the inner loop, driven with plain Python objects."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from common.checkpoint import checkpoints
from common.errors import DivergedError
from common.run.protocol import EarlyStopRequest
from common.signals import StopRequest
from common.storage import open_storage
from tests.helpers import Recorder
from trainer.actions import CheckFinite, CheckStopRequest, LoopOutput, Report, SaveCheckpoints, make_actions
from trainer.loop import train


def output(first: int, step: int, *, finite: bool = True) -> LoopOutput:
    return LoopOutput(first_step=first, step=step, loss=0.5, all_finite=finite, steps_per_sec=100.0, lr=1e-3)


class Saves(SaveCheckpoints):
    """Records the steps it would commit instead of writing checkpoints."""

    def __init__(self, stop: StopRequest, *, every: int = 20, last_step: int = 60) -> None:
        self.saved: list[int] = []
        super().__init__(self._record, every=every, last_step=last_step, stop=stop)

    def _record(self, step: int) -> str:
        self.saved.append(step)
        return f"model-{step}"


class Updates(Recorder):
    """A reporter that keeps every metrics dict it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: list[dict[str, float]] = []

    def update(self, metrics: dict[str, float]) -> None:
        self.updates.append(metrics)


def test_saves_at_each_multiple_at_the_last_step_and_on_a_stop() -> None:
    stop = StopRequest()
    saves = Saves(stop, every=20, last_step=55)
    for first, step in ((0, 10), (10, 20), (20, 30), (30, 40), (40, 50), (50, 55)):
        saves(output(first, step))
    assert saves.saved == [20, 40, 55] and saves.last_saved == "model-55"
    stop.set("SIGTERM")
    saves(output(55, 57))
    assert saves.saved[-1] == 57


def test_a_resumed_run_saves_at_the_next_multiple() -> None:
    saves = Saves(StopRequest(), every=1000, last_step=10_000)
    saves(output(4321, 4341))
    saves(output(4980, 5000))
    assert saves.saved == [5000]


def test_non_finite_loss_names_the_last_checkpoint() -> None:
    saves = Saves(StopRequest())
    check = CheckFinite(saves)
    with pytest.raises(DivergedError, match="between steps 0 and 10; nothing after the last committed checkpoint"):
        check(output(0, 10, finite=False))
    saves(output(10, 20))
    check(output(20, 30))
    with pytest.raises(DivergedError, match="between steps 30 and 40; nothing after model-20 was saved"):
        check(output(30, 40, finite=False))


def test_stop_request_ends_the_run_as_done_and_is_remembered() -> None:
    stop = StopRequest()
    request = EarlyStopRequest(step=40, time=1.0, reason="no improvement")
    check = CheckStopRequest(lambda: request, stop)
    check(output(40, 50))
    assert stop.reason == "early stop requested by the evaluator: no improvement" and stop.finish
    assert check.honoured == request


def test_a_signal_wins_over_a_later_stop_request() -> None:
    stop = StopRequest()
    stop.set("SIGINT")
    polled: list[int] = []

    def poll() -> EarlyStopRequest:
        polled.append(1)
        return EarlyStopRequest(step=1)

    check = CheckStopRequest(poll, stop)
    check(output(0, 10))
    assert (stop.reason, stop.finish, check.honoured, polled) == ("SIGINT", False, None, [])


def test_report_hands_the_metrics_in_log_order() -> None:
    display = Updates()
    Report(display)(output(0, 10))
    assert list(display.updates[0].items()) == [("step", 10), ("loss", 0.5), ("steps_per_sec", 100.0), ("lr", 1e-3)]


def test_chief_runs_every_action_in_order_and_other_workers_only_the_shared_ones() -> None:
    stop = StopRequest()
    saves = Saves(stop)
    check = CheckStopRequest(lambda: None, stop)
    chief = make_actions(saves=saves, stop_check=check, displays=[Updates(), Updates()])
    assert [type(a) for a in chief] == [CheckFinite, CheckStopRequest, Report, Report, Saves]
    worker = make_actions(saves=saves, stop_check=check, displays=[Updates()], chief=False)
    assert [type(a) for a in worker] == [CheckFinite, Saves]


def test_a_diverged_call_is_neither_reported_nor_saved() -> None:
    stop = StopRequest()
    saves, display = Saves(stop), Updates()
    actions = make_actions(saves=saves, stop_check=CheckStopRequest(lambda: None, stop), displays=[display])
    with pytest.raises(DivergedError):
        for action in actions:
            action(output(10, 20, finite=False))
    assert display.updates == [] and saves.saved == []


def test_a_stop_seen_after_a_call_is_saved_at_that_step() -> None:
    stop = StopRequest()
    saves = Saves(stop)
    check = CheckStopRequest(lambda: EarlyStopRequest(step=0), stop)
    actions = make_actions(saves=saves, stop_check=check, displays=[])
    for action in actions:
        action(output(0, 10))
    assert stop.finish and saves.saved == [10]


class StopAt(Recorder):
    """Sets the caller's StopRequest once training passes `step`, as a supervising thread might."""

    def __init__(self, stop: StopRequest, step: int) -> None:
        super().__init__()
        self.stop, self.step = stop, step

    def update(self, metrics: dict[str, float]) -> None:
        if metrics["step"] >= self.step:
            self.stop.set("test")


def test_train_honours_the_stop_request_it_is_given(make_config: Callable[..., Any]) -> None:
    stop = StopRequest()
    cfg = make_config(steps=60, save_every=40, steps_per_loop=10)
    result = train(cfg, reporter=StopAt(stop, 10), stop=stop)
    assert (result.stopped_by, result.final_step, result.metrics) == ("test", 10, {})
    assert checkpoints.on_disk(open_storage(cfg.workdir)) == [10]
    assert not (cfg.workdir / "done.json").exists()
    assert json.loads((cfg.workdir / "heartbeat.json").read_text())["state"] == "stopped"
