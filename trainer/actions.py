"""What runs after each call of the inner loop: the side effects of training, one small action each.

The outer loop (`trainer.loop.run_loop`) runs the `tf.function` for n steps, turns its outputs into
a `LoopOutput` and calls every action with it, in list order. Which actions a process runs is
decided once, in `make_actions`: a worker that is not the chief of a distributed run gets only
those that every worker must take part in. Actions do no file I/O of their own; what they read or
write comes in as a callable or a display, so a test can drive them with plain Python objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

from common.errors import DivergedError
from common.run.protocol import EarlyStopRequest
from common.signals import StopRequest
from trainer.progress import Reporter


@dataclasses.dataclass(frozen=True)
class LoopOutput:
    """What one call of the inner loop did, in Python numbers."""

    first_step: int  # global step before the call
    step: int  # global step after it
    loss: float  # mean loss over the call's steps
    all_finite: bool  # whether every step's loss was finite
    steps_per_sec: float  # speed of the call
    lr: float  # learning rate at `step`

    def metrics(self) -> dict[str, float]:
        """The dict that displays consume; its order is the order of the plain log line."""
        return {"step": self.step, "loss": self.loss, "steps_per_sec": self.steps_per_sec, "lr": self.lr}


class Action(Protocol):
    """Something the outer loop runs after every call of the inner loop."""

    def __call__(self, out: LoopOutput) -> None: ...


class SaveCheckpoints:
    """Commit a checkpoint when a multiple of `every` is reached, at the last step, and on a stop."""

    def __init__(self, save: Callable[[int], str], *, every: int, last_step: int, stop: StopRequest,
                 poll: Callable[[], None] | None = None) -> None:
        self.save = save  # commits a checkpoint for a step (or starts its background save) and returns its prefix
        self.poll = poll  # reports a finished background save and raises its failure
        self.every = every
        self.last_step = last_step
        self.stop = stop
        self.last_saved: str | None = None  # the prefix of the last checkpoint this run saved (async: committed
        # once the pending save is, which the end of training waits for)

    def __call__(self, out: LoopOutput) -> None:
        if self.poll is not None:
            self.poll()
        crossed = out.step // self.every > out.first_step // self.every
        if crossed or out.step >= self.last_step or self.stop:
            self.last_saved = self.save(out.step)


class CheckFinite:
    """Stop at once on a non-finite loss, before anything of that call can be saved."""

    def __init__(self, saves: SaveCheckpoints) -> None:
        self.saves = saves  # names the last good checkpoint in the error

    def __call__(self, out: LoopOutput) -> None:
        if not out.all_finite:
            last = self.saves.last_saved or "the last committed checkpoint"
            raise DivergedError(f"non-finite loss between steps {out.first_step} and {out.step}; "
                                f"nothing after {last} was saved")


class CheckStopRequest:
    """End the run, as if done, when the evaluator asks for an early stop; remember the request."""

    def __init__(self, poll: Callable[[], EarlyStopRequest | None], stop: StopRequest) -> None:
        self.poll = poll  # returns the evaluator's pending, unspent stop request, if any
        self.stop = stop
        self.honoured: EarlyStopRequest | None = None  # the request this run stopped for

    def __call__(self, out: LoopOutput) -> None:
        if self.stop:  # a signal came first: it decides how the run ends
            return
        request = self.poll()
        if request is not None:
            self.stop.set(f"early stop requested by the evaluator: {request.reason or 'no reason given'}",
                          finish=True)
            self.honoured = request


class Report:
    """Hand the call's metrics to one display: the progress bar or log, the heartbeat, TensorBoard."""

    def __init__(self, display: Reporter) -> None:
        self.display = display

    def __call__(self, out: LoopOutput) -> None:
        self.display.update(out.metrics())


def make_actions(*, saves: SaveCheckpoints, stop_check: CheckStopRequest, displays: Sequence[Reporter],
                 chief: bool = True, agree: Action | None = None) -> list[Action]:
    """The actions one process runs after each call, in order.

    The loss check comes first, so nothing from a diverged call is reported or saved; the stop
    check comes before the save, so a stop is saved at the step it was seen. Every worker checks
    the loss and takes part in every save (TF needs all workers in a save); only the chief reads
    the evaluator's requests and feeds the displays. In a multi-worker run `agree` (every worker
    runs it, just before the save) exchanges the stop requests, so that all workers stop, and
    save, at the same step.
    """
    chief_only: list[Action] = [stop_check, *(Report(d) for d in displays)] if chief else []
    return [CheckFinite(saves), *chief_only, *([agree] if agree is not None else []), saves]
