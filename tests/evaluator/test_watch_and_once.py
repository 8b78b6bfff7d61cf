from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from watchdog.events import FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileOpenedEvent

from common.checkpoint import checkpoints
from common.data import datasets
from common.model.ema import variables_to_restore
from common.model.evaluation import Evaluation
from common.run.ledger import Ledger
from common.run.protocol import LedgerRow
from common.signals import StopRequest
from common.storage import open_storage
from common.storage.local import NameHandler
from evaluator.config import EvalConfig
from evaluator.loop import run_once, run_watch
from evaluator.session import Session
from evaluator.wakeups import WATCHED_NAMES, Wake
from tests.helpers import Spy, checkpoint_files, mnist_model, watch_beside
from tests.helpers import run_evaluator_cli as run_cli


def eval_config(workdir: Path, tiny_data: Path, **kw: Any) -> EvalConfig:
    return EvalConfig(workdir=workdir, data_dir=str(tiny_data), **kw)


@pytest.mark.parametrize(("event", "wakes"), [
    (FileMovedEvent("/w/checkpoint.tmp1a2b", "/w/checkpoint"), True),  # how TF and we commit
    (FileCreatedEvent("/w/checkpoint"), True),
    (FileModifiedEvent("/w/checkpoint"), True),
    (FileCreatedEvent("/w/done.json"), True),
    (FileModifiedEvent("/w/model-20.index"), False),
    (FileModifiedEvent("/w/checkpoint.tmp1a2b"), False),
    (FileOpenedEvent("/w/checkpoint"), False),  # reading the file must not wake the reader
])
def test_handler_wakes_only_for_state_file_commits(event: Any, wakes: bool) -> None:
    wake = Wake()
    NameHandler(WATCHED_NAMES, wake.set).dispatch(event)
    assert wake.event.is_set() is wakes


def test_pending_in_commit_order_and_policy(workdir: Path, tiny_data: Path) -> None:
    session = Session(eval_config(workdir, tiny_data))
    listed = session.listed()
    assert [c.name for c in listed] == ["model-20", "model-40", "model-60"]
    assert session.pending(listed) == listed
    session.evaluate(listed[0])
    assert [c.name for c in session.pending(listed)] == ["model-40", "model-60"]
    latest = Session(eval_config(workdir, tiny_data, policy="latest"))
    assert [c.name for c in latest.pending(latest.listed())] == ["model-60"]


def test_once_records_everything_then_nothing_again(workdir: Path, tiny_data: Path) -> None:
    cfg = eval_config(workdir, tiny_data)
    run_once(cfg)
    records = Ledger(open_storage(workdir)).read()
    assert [r["checkpoint"] for r in records] == ["model-20", "model-40", "model-60"]
    first = records[0]
    for field in ("step", "checkpoint", "split", "weights", "accuracy", "loss", "examples", "per_class_accuracy",
                  "eval_secs", "committed", "detected", "finished", "data_fingerprint", "status"):
        assert field in first, field
    assert (first["step"], first["split"], first["weights"], first["examples"]) == (20, "validation", "ema", 50)
    assert len(first["per_class_accuracy"]) == 10
    run_once(cfg)  # a restarted evaluator re-evaluates nothing
    assert len(Ledger(open_storage(workdir)).read()) == 3
    assert not list((workdir / "eval").glob(".snapshot-*"))


def test_ema_accuracy_is_that_of_the_shadows(workdir: Path, tiny_data: Path) -> None:
    run_once(eval_config(workdir, tiny_data, weights="both", splits=("test",)))
    records = [r for r in Ledger(open_storage(workdir)).read() if r["checkpoint"] == "model-60"]
    by_kind = {r["weights"]: r for r in records}
    model = mnist_model("softmax")
    checkpoints.restore_variables(workdir / "model-60", variables_to_restore(model))
    info = datasets.get_info("fashion-mnist")
    prepare = lambda x: info.preprocessing.apply(x, info.input_spec)  # noqa: E731
    expected = Evaluation(model, prepare)(datasets.load("fashion-mnist", str(tiny_data)).test)
    assert by_kind["ema"]["accuracy"] == expected["accuracy"]
    assert by_kind["ema"]["loss"] == pytest.approx(expected["loss"])
    assert by_kind["raw"]["loss"] != by_kind["ema"]["loss"]
    rows = Session(eval_config(workdir, tiny_data, weights="both", splits=("test",))).rows()
    assert rows[-1].raw_accuracy == by_kind["raw"]["accuracy"]


def test_deleted_checkpoint_is_gone_not_error(workdir: Path, tiny_data: Path) -> None:
    session = Session(eval_config(workdir, tiny_data))
    listed = session.listed()
    for file in checkpoint_files(workdir / "model-20"):
        file.unlink()  # retention got there first
    session.evaluate(listed[0])
    (record,) = [r for r in Ledger(open_storage(workdir)).read() if r["checkpoint"] == "model-20"]
    assert record["status"] == "gone" and "model-20.index is gone" in record["reason"]
    assert "model-20" not in [c.name for c in session.pending(session.listed())]


def test_corrupt_checkpoint_is_recorded_once(workdir: Path, tiny_data: Path) -> None:
    data = next(workdir.glob("model-40.data-*"))
    data.write_bytes(data.read_bytes()[:1000])
    run_once(eval_config(workdir, tiny_data))
    by_name = {r["checkpoint"]: r for r in Ledger(open_storage(workdir)).read()}
    assert by_name["model-40"]["status"] == "error" and "model-40" in by_name["model-40"]["reason"]
    assert by_name["model-20"]["status"] == by_name["model-60"]["status"] == "ok"
    run_once(eval_config(workdir, tiny_data))  # never retried
    assert len(Ledger(open_storage(workdir)).read()) == 3


def test_missing_shadows_fail_loudly(workdir: Path, tiny_data: Path) -> None:
    model = mnist_model("softmax")
    tf.train.Checkpoint(global_step=tf.Variable(80, dtype=tf.int64), model=model).write(str(workdir / "model-80"))
    state = checkpoints.read_state(open_storage(workdir))
    assert state is not None
    state.paths.append("model-80")
    state.timestamps.append(state.timestamps[-1] + 1)
    state.latest = "model-80"
    checkpoints.write_state(open_storage(workdir), state)
    run_once(eval_config(workdir, tiny_data, policy="latest"))
    (record,) = Ledger(open_storage(workdir)).read()
    assert record["status"] == "error"
    assert "no ema/fc1/kernel, ema/fc1/bias in the checkpoint" in record["reason"]


def test_snapshot_survives_deletion_mid_read(workdir: Path) -> None:
    model = mnist_model("softmax")
    with open_storage(workdir).pin("model-60") as private:
        for file in checkpoint_files(workdir / "model-60"):
            file.unlink()
        checkpoints.restore_variables(private, variables_to_restore(model))
    assert not list((workdir / "eval").iterdir())


def test_ledger_dedupes_and_skips_broken_lines(tmp_path: Path) -> None:
    ledger = Ledger(open_storage(tmp_path))
    row = LedgerRow({"checkpoint": "model-1", "committed": 1.0, "split": "validation", "weights": "ema",
                     "accuracy": 0.5})
    assert ledger.append([row]) == [row]
    assert ledger.append([row]) == []
    with open(ledger.path, "a") as f:
        f.write('{"checkpoint": "model-2", "comm')  # a torn line from some other writer
    assert ledger.read() == [row.to_json()]


def test_a_commit_evaluated_then_deleted_before_a_rescan_reads_it_is_not_recorded_gone(workdir: Path,
                                                                                      tiny_data: Path) -> None:
    # The race a kill storm found: retention deletes model-20 between the listing and the fingerprint's read.
    session = Session(eval_config(workdir, tiny_data))
    (first, *_) = session.listed()
    session.evaluate(first)
    for path in checkpoint_files(workdir / first.name):
        path.unlink()
    (again, *_) = session.listed()
    assert again.name == first.name and again.fingerprint is None and not again.on_disk
    assert again not in session.pending(session.listed())
    gone = LedgerRow({"checkpoint": first.name, "committed": first.committed, "split": "validation",
                      "weights": "ema", "index_fingerprint": None, "status": "gone"})
    assert session.ledger.append([gone]) == []  # the evaluation of that commit stands
    # Another commit under the name, gone before any read:
    other = LedgerRow(gone.to_json() | {"committed": first.committed + 1})
    assert session.ledger.append([other]) == [other]
    session.close()


def test_watch_evaluates_all_and_exits_when_done(workdir: Path, tiny_data: Path) -> None:
    spy = Spy()
    run_watch(eval_config(workdir, tiny_data, exit_when_done=True), spy, StopRequest())
    assert [r.checkpoint for r in spy.rows] == ["model-20", "model-40", "model-60"]
    assert sum(r.best for r in spy.rows) == 1
    assert spy.statuses[-1]["state"] == "trainer finished; all evaluated"


def test_watch_waits_out_a_workdir_without_run_json(tmp_path: Path, tiny_data: Path) -> None:
    (tmp_path / "w").mkdir()
    stop = StopRequest()
    spy = Spy(stop, until=lambda s: any("no run.json" in w for w in s["warnings"]))
    run_watch(eval_config(tmp_path / "w", tiny_data), spy, stop)
    assert spy.statuses[-1]["state"] == "waiting for the trainer"


def test_watch_waits_for_a_missing_workdir(tmp_path: Path, tiny_data: Path) -> None:
    stop = StopRequest()
    spy = Spy(stop, until=lambda s: s["state"].startswith("waiting for"))
    run_watch(eval_config(tmp_path / "later", tiny_data), spy, stop)
    assert spy.statuses[0]["state"] == f"waiting for {tmp_path / 'later'} to appear"


def test_cli_once_table_and_json(workdir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once"], capsys)
    assert code == 0 and "model-60" in out and "★" in out
    code, out, _ = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once", "--json"], capsys)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["step"] for r in lines] == [20, 40, 60]


@pytest.mark.parametrize(("setup", "flags", "message"), [
    ("empty", ["--once"], "no run.json"),
    ("no-checkpoint", ["--once"], "no checkpoint to evaluate"),
    ("bad-model", ["--once"], "unknown model 'resnet'"),
    ("bad-state", ["--once"], "corrupt state file"),
    ("empty", ["--json"], "--json goes with --once"),
    ("empty", ["--once", "--rescan-secs", "0"], "--rescan-secs (0.0) must be positive"),
])
def test_cli_errors_exit_2(setup: str, flags: list[str], message: str, workdir: Path, tmp_path: Path,
                           tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "target"
    target.mkdir()
    if setup != "empty":
        shutil.copy(workdir / "run.json", target / "run.json")
    if setup == "bad-model":
        run = json.loads((target / "run.json").read_text())
        (target / "run.json").write_text(json.dumps(run | {"model": "resnet"}))
    if setup == "bad-state":
        (target / "checkpoint").write_text('model_checkpoint_path: "model-')
    code, _, err = run_cli(["--workdir", str(target), "--data-dir", str(tiny_data), *flags], capsys)
    assert code == 2 and err.startswith("evaluator: error: ") and message in err and err.count("\n") == 1


def test_trainer_and_watching_evaluator_end_to_end(tmp_path: Path, tiny_data: Path) -> None:
    """A real trainer process and the real watching evaluator: every checkpoint lands once."""
    workdir = tmp_path / "live"
    stop, _, err, code = watch_beside(
        "trainer.cli",
        ["--workdir", str(workdir), "--data-dir", str(tiny_data), "--model", "softmax", "--steps", "300",
         "--save-every", "30", "--keep", "0", "--steps-per-loop", "10"],
        eval_config(workdir, tiny_data, exit_when_done=True), Spy())
    assert code == 0, err
    assert stop.reason is None, "the evaluator did not finish in time"
    records = Ledger(open_storage(workdir)).read()
    assert sorted(r["step"] for r in records) == list(range(30, 301, 30))
    assert all(r["status"] == "ok" for r in records)
    assert all(r["finished"] >= r["detected"] >= r["committed"] - 1 for r in records)
    assert np.isfinite([r["accuracy"] for r in records]).all()


def test_plain_lines_print_each_result_once(workdir: Path, tiny_data: Path) -> None:
    import io

    from evaluator.display import PlainLines

    session = run_once(eval_config(workdir, tiny_data))
    out = io.StringIO()
    lines = PlainLines(out)
    lines.update(session.rows(), session.status(0) | {"state": "watching"})
    lines.update(session.rows(), session.status(0) | {"state": "watching"})
    text = out.getvalue().splitlines()
    results = [line for line in text if " evaluator result " in line]
    assert len(results) == 3 and "step=60 checkpoint=model-60 status=ok accuracy=" in results[-1]
    assert sum(" evaluator status " in line for line in text) == 1


def test_header_warns_about_unreadable_checkpoints(workdir: Path, tiny_data: Path) -> None:
    for data in workdir.glob("model-20.data-*"):
        data.write_bytes(b"")
    session = run_once(eval_config(workdir, tiny_data))
    assert any("1 checkpoint(s) could not be read: model-20" in w for w in session.status(0)["warnings"])
