"""The typed files between the programs: round trips, the fields on disk, and tolerant reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.layout import BEST_JSON, DONE_FILE, EVAL_DIR, HEARTBEAT_FILE, STOP_REQUEST_FILE
from common.run.protocol import (
    FINGERPRINT,
    SPENT_KEY,
    BestEntry,
    EarlyStopRequest,
    LedgerRow,
    StopRequestId,
    TrainerHeartbeat,
    TrainingDone,
)
from common.storage import open_storage
from evaluator.early_stop import request_stop
from evaluator.status import trainer_status
from trainer.progress import Heartbeat

MESSAGES: dict[str, Any] = {HEARTBEAT_FILE: TrainerHeartbeat, DONE_FILE: TrainingDone,
                            STOP_REQUEST_FILE: EarlyStopRequest}
SPENT = StopRequestId(step=40, time=1700000000.5)


def on_disk(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_stop_request_round_trip_and_fields(tmp_path: Path) -> None:
    request = EarlyStopRequest(step=40, reason="no improvement", time=1.5, pid=7)
    request.write(open_storage(tmp_path))
    assert on_disk(tmp_path / STOP_REQUEST_FILE) == {"step": 40, "reason": "no improvement", "time": 1.5, "pid": 7}
    assert EarlyStopRequest.read(open_storage(tmp_path)) == request
    assert request.id == StopRequestId(step=40, time=1.5)


def test_done_round_trip_and_fields(tmp_path: Path) -> None:
    done = TrainingDone(step=100, checkpoint="model-100", time=2.0, stop_reason=None,
                        ema_metrics={"validation": {"accuracy": 0.5}}, spent_stop_request=SPENT)
    done.write(open_storage(tmp_path))
    assert on_disk(tmp_path / DONE_FILE) == {"step": 100, "checkpoint": "model-100", "time": 2.0, "stop_reason": None,
                                             "ema_metrics": {"validation": {"accuracy": 0.5}},
                                             SPENT_KEY: {"step": 40, "time": 1700000000.5}}
    assert TrainingDone.read(open_storage(tmp_path)) == done
    TrainingDone(step=100).write(open_storage(tmp_path))
    assert on_disk(tmp_path / DONE_FILE)[SPENT_KEY] is None  # written as null, as the trainer always did


def test_best_round_trip_keeps_unknown_fields(tmp_path: Path) -> None:
    fields = {"step": 20, "checkpoint": "model-20", "accuracy": 0.9, "loss": 0.3, "split": "validation",
              "weights": "ema", "committed": 1.0, "source": "/w/model-20", "time": 3.0}
    (tmp_path / EVAL_DIR).mkdir()
    (tmp_path / EVAL_DIR / BEST_JSON).write_text(json.dumps(fields | {"from_a_newer_version": [1]}))
    entry = BestEntry.read(open_storage(tmp_path))
    assert entry is not None and entry.checkpoint == "model-20" and entry.accuracy == 0.9
    entry.write_into(tmp_path)
    assert on_disk(tmp_path / BEST_JSON) == fields | {"from_a_newer_version": [1]}


def test_heartbeat_reporter_writes_the_fields_it_always_wrote(tmp_path: Path) -> None:
    beat = Heartbeat(open_storage(tmp_path), every_secs=0.0, extra={SPENT_KEY: SPENT.to_json()})
    beat.start(first_step=0, total_steps=100)
    assert set(on_disk(tmp_path / HEARTBEAT_FILE)) == {"pid", "time", "total_steps", "step", "steps_per_sec",
                                                        "state", SPENT_KEY}
    beat.update({"step": 10, "loss": 0.5, "steps_per_sec": 99.0, "lr": 0.001})
    written = on_disk(tmp_path / HEARTBEAT_FILE)
    assert {k: written[k] for k in ("step", "loss", "steps_per_sec", "lr", "state", "total_steps")} == {
        "step": 10, "loss": 0.5, "steps_per_sec": 99.0, "lr": 0.001, "state": "running", "total_steps": 100}
    beat.close()
    assert set(on_disk(tmp_path / HEARTBEAT_FILE)) == {"pid", "time", "total_steps", "state", SPENT_KEY}
    read = TrainerHeartbeat.read(open_storage(tmp_path))
    assert read is not None and read.state == "stopped" and read.spent_stop_request == SPENT


def test_heartbeat_reporter_takes_the_spent_request_typed(tmp_path: Path) -> None:
    beat = Heartbeat(open_storage(tmp_path), spent=None)
    beat.start(first_step=0, total_steps=10)
    assert SPENT_KEY not in on_disk(tmp_path / HEARTBEAT_FILE)
    beat.spent = SPENT
    beat.close()
    assert on_disk(tmp_path / HEARTBEAT_FILE)[SPENT_KEY] == {"step": 40, "time": 1700000000.5}


def test_older_files_read_with_defaults(tmp_path: Path) -> None:
    (tmp_path / STOP_REQUEST_FILE).write_text(json.dumps({"step": 20, "reason": "old"}))
    assert EarlyStopRequest.read(open_storage(tmp_path)) == EarlyStopRequest(step=20, reason="old")
    (tmp_path / DONE_FILE).write_text(json.dumps({"step": 20, "checkpoint": "model-20"}))
    done = TrainingDone.read(open_storage(tmp_path))
    assert done is not None and done.spent_stop_request is None and done.ema_metrics == {}
    old_row = {"checkpoint": "model-1", "committed": 1.0, "status": "ok", "accuracy": 0.5}
    row = LedgerRow.from_json(old_row)
    assert row is not None and not row.fingerprinted and row.index_fingerprint is None


@pytest.mark.parametrize("content", [b"", b"{", b"[1, 2]", b"null", b'"text"', b"\xff\xfe", b'{"step": true}',
                                     b'{"step": "40"}', b'{"time": "now"}'])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_broken_files_read_as_none(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    assert MESSAGES[name].read(open_storage(tmp_path)) is None


@pytest.mark.parametrize("spent", [3, "x", {"step": "40"}, {"time": "now"}])
@pytest.mark.parametrize("name", [HEARTBEAT_FILE, DONE_FILE])
def test_a_broken_spent_request_makes_the_file_unreadable(tmp_path: Path, name: str, spent: Any) -> None:
    (tmp_path / name).write_text(json.dumps({"step": 10, SPENT_KEY: spent}))
    assert MESSAGES[name].read(open_storage(tmp_path)) is None


def test_absent_files_read_as_none(tmp_path: Path) -> None:
    assert all(message.read(open_storage(tmp_path)) is None for message in MESSAGES.values())
    assert BestEntry.read(open_storage(tmp_path)) is None


def test_best_without_a_checkpoint_is_unreadable() -> None:
    assert BestEntry.from_json({"step": 20, "accuracy": 0.9}) is None
    assert BestEntry.from_json({"checkpoint": "model-20", "accuracy": "high"}) is None


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda children: st.lists(children) | st.dictionaries(st.text(), children), max_leaves=10))
def test_readers_never_raise(obj: Any) -> None:
    for message in (*MESSAGES.values(), BestEntry, LedgerRow, StopRequestId):
        message.from_json(obj)
    if isinstance(obj, dict):
        for key in ("step", "checkpoint", "accuracy", "time", SPENT_KEY, FINGERPRINT):
            for message in (*MESSAGES.values(), BestEntry, LedgerRow):
                message.from_json({key: obj})


def test_ledger_line_round_trip_is_byte_for_byte() -> None:
    record = {"checkpoint": "model-20", "step": 20, "split": "validation", "weights": "ema", "status": "ok",
              "accuracy": 0.5, "per_class_accuracy": [0.5, None], FINGERPRINT: None, "count": 8}
    line = json.dumps(record, sort_keys=True).encode() + b"\n"
    row = LedgerRow.from_line(line)
    assert row is not None and row.to_line() == line and row.to_json() == record
    assert row.fingerprinted and row.per_class_accuracy == [0.5, None] and row.status == "ok"


@pytest.mark.parametrize("line", [b'{"checkpoint": "model-9", "sta', b'{"checkpoint": "caf\xe9"}', b"[1]",
                                  b'{"step": "20"}', b'{"accuracy": "high"}', b'{"status": 1}'])
def test_ledger_lines_that_are_not_rows(line: bytes) -> None:
    assert LedgerRow.from_line(line) is None


def test_trainer_status_from_typed_files(tmp_path: Path) -> None:
    assert trainer_status(open_storage(tmp_path), 120.0) == ("not seen yet", "")
    (tmp_path / HEARTBEAT_FILE).write_text("garbage")
    assert trainer_status(open_storage(tmp_path), 120.0) == ("not seen yet", "")
    beat = TrainerHeartbeat(step=10, total_steps=100, steps_per_sec=50.0, state="running", time=0.0)
    beat.write(open_storage(tmp_path))
    line, warning = trainer_status(open_storage(tmp_path), 120.0)
    assert line.startswith("step 10/100, 50.0 steps/s") and warning.startswith("trainer silent for")
    TrainingDone(step=100).write(open_storage(tmp_path))
    assert trainer_status(open_storage(tmp_path), 120.0) == ("finished at step 100", "")


def test_stop_request_is_written_once_per_step(tmp_path: Path) -> None:
    request_stop(open_storage(tmp_path), 40, "first")
    request_stop(open_storage(tmp_path), 40, "second")
    request = on_disk(tmp_path / STOP_REQUEST_FILE)
    assert set(request) == {"step", "reason", "time", "pid"} and request["reason"] == "first"
    request_stop(open_storage(tmp_path), 60, "later")
    assert (EarlyStopRequest.read(open_storage(tmp_path)) or EarlyStopRequest()).reason == "later"
