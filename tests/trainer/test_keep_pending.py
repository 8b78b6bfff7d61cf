"""Retention beside evaluators: `--keep-pending N` keeps unevaluated checkpoints while an evaluator watches,
and every commit deleted unread gets a `skipped` row, so the ledger names every commit the state file listed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.checkpoint import checkpoints
from common.layout import EVALUATOR_LEASE
from common.run.ledger import Ledger
from common.storage import open_storage
from tests.helpers import Recorder, run_evaluator_cli
from trainer.loop import train

STEPS = [f"model-{s}" for s in range(10, 90, 10)]


def test_a_watched_workdir_keeps_pending_checkpoints_and_records_the_rest_as_skipped(
        make_config: Callable[..., Any], tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_config(steps=80, save_every=10, keep=2, keep_pending=3)
    storage = open_storage(cfg.workdir)
    with storage.lease(EVALUATOR_LEASE):  # an evaluator watches, and evaluates nothing
        train(cfg, reporter=Recorder())
    state = checkpoints.read_state(storage)
    assert state is not None and state.paths == STEPS[-5:]  # the newest 2, and 3 more not yet evaluated
    skipped = [r for r in Ledger(storage).read() if r["status"] == "skipped"]
    assert [r["checkpoint"] for r in skipped] == STEPS[:3]  # a row for every commit deleted unread
    assert all("--keep 2, --keep-pending 3" in r["reason"] and r["committed"] > 0 for r in skipped)

    code, out, err = run_evaluator_cli(["--workdir", str(cfg.workdir), "--data-dir", str(tiny_data),
                                        "--once", "--json"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted((r["checkpoint"], r["status"]) for r in rows) == sorted(
        [(name, "skipped") for name in STEPS[:3]] + [(name, "ok") for name in STEPS[3:]])


def test_keep_pending_spares_only_unevaluated_checkpoints_and_nothing_without_an_evaluator(
        make_config: Callable[..., Any], tiny_data: Path) -> None:
    cfg = make_config(steps=40, save_every=10, keep=1, keep_pending=5)
    train(cfg, reporter=Recorder())  # no evaluator registered: --keep alone decides, and no row is written
    storage = open_storage(cfg.workdir)
    assert checkpoints.on_disk(storage) == [40] and Ledger(storage).read() == []
    from evaluator.config import EvalConfig
    from evaluator.loop import run_once

    # model-40 evaluated (on the test split, so that it does not become the best, which retention keeps)
    run_once(EvalConfig(workdir=cfg.workdir, data_dir=str(tiny_data), splits=("test",)))
    with storage.lease(EVALUATOR_LEASE):
        train(make_config(steps=60, save_every=10, keep=1, keep_pending=5), reporter=Recorder())
    # 50 is pending and kept beside the newest; 40 was evaluated: retention deletes it, with no skipped row.
    assert checkpoints.on_disk(storage) == [50, 60]
    assert [r["status"] for r in Ledger(storage).read()] == ["ok"]


def test_keep_pending_must_not_be_negative(make_config: Callable[..., Any]) -> None:
    from common.errors import UsageError

    with pytest.raises(UsageError, match=r"--keep-pending \(-1\) must be 0"):
        make_config(keep_pending=-1)
