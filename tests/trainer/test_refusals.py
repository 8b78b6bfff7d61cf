"""The trainer under hostile input and interrupted runs: spent stop requests, checks before writes,
checkpoints the state file lost, clocks stepped back and a closed stdout."""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tensorflow as tf

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import State
from common.errors import UsageError, WorkdirIOError
from common.run.spec import MAX_CLASS_NAMES, read_run
from common.run.workdir import Workdir
from common.storage import open_storage
from evaluator.config import EvalConfig
from evaluator.loop import run_once
from tests.failing_disk import FailingDisk
from tests.helpers import REPO, Recorder, listing, make_train_config
from tests.helpers import run_trainer_cli as run_cli
from trainer import saver as saver_lib
from trainer.loop import train
from trainer.progress import STDOUT_CLOSED, PlainLog


def write_request(workdir: Path, step: int, when: float | None = None) -> dict[str, Any]:
    """Write a stop request as the evaluator's --patience does."""
    request = {"step": step, "reason": "no improvement", "time": when or time.time(), "pid": 1}
    (workdir / "stop_request.json").write_text(json.dumps(request))
    return request


def read(workdir: Path, name: str) -> dict[str, Any]:
    return json.loads((workdir / name).read_text())


class Crash(Exception):
    """Stands for a kill in the middle of a run."""


class CrashingRecorder(Recorder):
    """Fails at the first progress update, after the start removed done.json."""

    def update(self, metrics: dict[str, float]) -> None:
        raise Crash


class EvaluatorAt(Recorder):
    """Writes a fresh stop request when training passes `step`, as a running evaluator would."""

    def __init__(self, workdir: Path, step: int) -> None:
        super().__init__()
        self.workdir, self.step, self.asked = workdir, step, False

    def update(self, metrics: dict[str, float]) -> None:
        if metrics["step"] >= self.step and not self.asked:
            self.asked = True
            write_request(self.workdir, int(metrics["step"]))


# Item 5: a stop request ends a run once.

def test_request_made_after_the_run_finished_does_not_stop_an_extended_run(
        make_config: Callable[..., Any]) -> None:
    train(make_config(steps=40), reporter=Recorder())
    write_request(make_config().workdir, 40)  # the evaluator judged model-40 after the trainer finished
    rec = Recorder()
    result = train(make_config(steps=80), reporter=rec)
    assert result.stopped_by is None and result.final_step == 80
    assert any("ignoring the evaluator's stop request of step 40: already spent" in m for m in rec.messages)


def test_request_honoured_once_and_recorded_in_done_json(make_config: Callable[..., Any]) -> None:
    train(make_config(steps=40), reporter=Recorder())
    workdir = make_config().workdir
    (workdir / "done.json").unlink()  # the trainer was killed at 40: the request below was never handled
    request = write_request(workdir, 40)
    first = train(make_config(steps=200), reporter=Recorder())
    assert first.stopped_by and "early stop requested" in first.stopped_by and first.final_step == 50
    assert read(workdir, "done.json")["spent_stop_request"] == {"step": 40, "time": request["time"]}
    second = train(make_config(steps=100), reporter=Recorder())
    assert second.stopped_by is None and second.final_step == 100


def test_spent_request_survives_a_crash_of_the_extended_run(make_config: Callable[..., Any]) -> None:
    train(make_config(steps=40), reporter=Recorder())
    workdir = make_config().workdir
    write_request(workdir, 40)  # spent: the run had finished at 40
    with pytest.raises(Crash):
        train(make_config(steps=100), reporter=CrashingRecorder())
    assert not (workdir / "done.json").exists()
    assert read(workdir, "heartbeat.json")["spent_stop_request"]["step"] == 40
    result = train(make_config(steps=100), reporter=Recorder())
    assert result.start_step == 40 and result.stopped_by is None and result.final_step == 100


def test_new_request_from_a_running_evaluator_still_stops(make_config: Callable[..., Any]) -> None:
    train(make_config(steps=40), reporter=Recorder())
    workdir = make_config().workdir
    write_request(workdir, 40, when=1.0)  # spent
    result = train(make_config(steps=400), reporter=EvaluatorAt(workdir, 80))
    assert result.stopped_by and "early stop requested" in result.stopped_by
    assert result.final_step == 90
    assert read(workdir, "done.json")["spent_stop_request"]["step"] == 80


def test_request_at_the_resume_step_not_handled_is_honoured(make_config: Callable[..., Any]) -> None:
    train(make_config(steps=40), reporter=Recorder())
    workdir = make_config().workdir
    (workdir / "done.json").unlink()  # killed at 40 before done.json
    write_request(workdir, 40)
    result = train(make_config(steps=200), reporter=Recorder())
    assert result.stopped_by and "early stop requested" in result.stopped_by


# Item 6: nothing changes in the workdir before the input is accepted.

def test_batch_size_larger_than_the_training_set_writes_nothing(tmp_path: Path, tiny_data: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "t1"
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--batch-size", "1000000000"],
                           capsys)
    assert code == 2 and err.count("\n") == 1
    assert "--batch-size (1000000000) is larger than the training split" in err
    assert not workdir.exists()


@pytest.mark.parametrize(("edit", "message"), [
    ({"batch_size": 1_000_000_000}, "--batch-size (1000000000) is larger than the training split"),
    ({"classes": [99, 1], "class_names": ["a", "b"]}, "classes ([99, 1]): 99 is not a class of fashion-mnist"),
    ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"class_names": ["a", "b"]}, "class_names has 2 names but the run has 10 classes"),
    ({"lr": "fast"}, "--lr ('fast') must be a finite number"),
    ({"seed": 1.5}, "--seed (1.5) must be an integer"),
    ({"freeze": "model/fc1/*"}, "freeze ('model/fc1/*') must be a list"),
    ({"classes": "5,6"}, "classes ('5,6') must be a list"),
])
def test_bad_run_json_is_one_line_and_changes_nothing(edit: dict[str, Any], message: str, workdir: Path,
                                                      tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = read(workdir, "run.json") | edit
    (workdir / "run.json").write_text(json.dumps(run))
    before = listing(workdir)
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--steps", "80"], capsys)
    assert code == 2 and err.startswith("trainer: error: ") and err.count("\n") == 1, err
    assert message in err
    assert listing(workdir) == before  # done.json, heartbeat, tb and run.json untouched


def test_classes_out_of_range_is_one_line_in_the_evaluator_too(workdir: Path, tiny_data: Path) -> None:
    run = read(workdir, "run.json") | {"classes": [99, 1], "class_names": ["a", "b"]}
    (workdir / "run.json").write_text(json.dumps(run))
    with pytest.raises(UsageError, match=r"run.json: bad run file: classes \(\[99, 1\]\): 99 is not a class") as e:
        run_once(EvalConfig(workdir=workdir, data_dir=str(tiny_data)))
    assert "\n" not in str(e.value)


def test_run_json_sizes_are_bounded(tmp_path: Path) -> None:
    spec = {"dataset": "mnist", "model": "mlp", "batch_size": 8, "lr": 0.1, "lr_decay_rate": 1.0,
            "lr_decay_steps": 10, "l2": 0.0, "ema_decay": 0.9, "seed": 0}
    (tmp_path / "run.json").write_text(json.dumps(spec | {"class_names": ["n"] * (MAX_CLASS_NAMES + 1)}))
    with pytest.raises(UsageError, match=f"class_names has {MAX_CLASS_NAMES + 1:,} names"):
        read_run(open_storage(tmp_path))
    (tmp_path / "run.json").write_text(json.dumps(spec | {"class_names": ["x" * 2_000_000]}))
    with pytest.raises(UsageError, match="run file larger than 1,000,000 bytes"):
        read_run(open_storage(tmp_path))


@pytest.mark.parametrize("overrides", [
    {"model": "mlp", "freeze": ("model/conv*",)},
    {"resume_from": "model-999"},
])
def test_rejected_start_creates_no_workdir(overrides: dict[str, Any], make_config: Callable[..., Any]) -> None:
    cfg = make_config(**overrides)
    with pytest.raises(UsageError):
        train(cfg, reporter=Recorder())
    assert not cfg.workdir.exists()


def test_hand_edited_class_names_are_named_as_an_edit(workdir: Path, tiny_data: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = read(workdir, "run.json")
    run["class_names"] = ["c" + str(i) for i in range(10)]
    (workdir / "run.json").write_text(json.dumps(run))
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data)], capsys)
    assert code == 2 and "run.json was edited: its class_names" in err and "flags given" not in err


# Item 7: what is on disk is what the state file lists.

def test_unlisted_checkpoints_are_removed_at_start(workdir: Path, tiny_data: Path) -> None:
    # As after a kill right after the state-file rename: the state file lists only model-60.
    state = State(latest="model-60", paths=["model-60"], timestamps=[time.time()])
    checkpoints.write_state(open_storage(workdir), state)
    (workdir / "eval").mkdir(exist_ok=True)
    (workdir / "eval" / "best.json").write_text(json.dumps({"checkpoint": "model-20"}))
    # As after kills inside later saves, before their commit: model-100 whole, model-120's data without its index.
    for file in workdir.glob("model-60.*"):
        (workdir / file.name.replace("model-60", "model-100")).write_bytes(file.read_bytes())
    (workdir / "model-120.data-00000-of-00001").write_bytes(b"cut")
    rec = Recorder()
    train(make_train_config(tiny_data, workdir, steps=80, keep=0), reporter=rec)  # fewer steps than were saved
    assert checkpoints.on_disk(open_storage(workdir)) == [20, 60, 80]  # model-20 is the evaluator's best
    assert not list(workdir.glob("model-1[02]0.*"))
    assert any(m.startswith("removed 3 checkpoint(s) that the state file does not list (left by an interrupted "
                            "save): model-40, model-100, model-120") for m in rec.messages), rec.messages


def test_retention_ignores_timestamps_from_a_clock_stepped_back(workdir: Path, tiny_data: Path) -> None:
    future = time.time() + 10 * 86400
    paths = ["model-20", "model-40", "model-60"]
    state = State(latest="model-60", paths=paths, timestamps=[future + i for i in range(3)])
    checkpoints.write_state(open_storage(workdir), state)
    train(make_train_config(tiny_data, workdir, steps=100, keep=2), reporter=Recorder())
    state = checkpoints.read_state(open_storage(workdir))
    assert state is not None and state.latest == "model-100" and state.paths == ["model-80", "model-100"]
    assert checkpoints.on_disk(open_storage(workdir)) == [80, 100]


def test_select_kept_keeps_the_new_checkpoint_whatever_the_timestamps() -> None:
    entries = [("model-150", 9e9), ("model-200", 9e9 + 1), ("model-400", 1.0)]
    kept, _ = saver_lib.select_kept(entries, keep=2, keep_every_hours=0, anchor=0)
    assert [p for p, _ in kept] == ["model-200", "model-400"]


def test_leftover_temp_link_is_removed_without_touching_its_target(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "model-5_temp").symlink_to(outside)
    assert open_storage(workdir).clean_leftovers() == ["model-5_temp"]
    assert not (workdir / "model-5_temp").is_symlink()
    assert (outside / "precious.txt").read_text() == "keep me"


# Item 4 of the tracebacks: a closed stdout.

class ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_plain_log_goes_on_on_stderr_when_its_pipe_closes(capsys: pytest.CaptureFixture[str]) -> None:
    log = PlainLog(every=1, stream=ClosedPipe())
    log.message("first")
    log.message("second")
    err = capsys.readouterr().err
    assert err.count(STDOUT_CLOSED) == 1 and "first\n" in err and "second\n" in err


def test_trainer_piped_into_head_finishes_the_run(tmp_path: Path, tiny_data: Path) -> None:
    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "trainer.cli", "--workdir", str(workdir), "--data-dir", str(tiny_data),
           "--model", "softmax", "--steps", "200", "--save-every", "100", "--log-every", "10",
           "--steps-per-loop", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    proc.stdout.readline()  # what `head -1` reads
    proc.stdout.close()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert STDOUT_CLOSED in err and "Traceback" not in err
    assert read(workdir, "done.json")["step"] == 200


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_a_lock_that_cannot_be_written_is_one_line_and_exit_5(tmp_path: Path, tiny_data: Path, error: int,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "run"
    workdir.mkdir()
    disk = FailingDisk(workdir, monkeypatch)
    disk.fail(error, only="trainer.lock")
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--model", "softmax",
                            "--steps", "20", "--save-every", "10"], capsys)
    assert code == 5 and err.count("\n") == 1 and "cannot take the trainer lock" in err, err
    assert disk.refused and not (workdir / "checkpoint").exists()
    disk.heal()
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--model", "softmax",
                            "--steps", "20", "--save-every", "10"], capsys)
    assert code == 0, err


@pytest.mark.parametrize(("program", "flags"), [("trainer", ["--workdir", "foo://b/run"]),
                                                ("evaluator", ["--workdir", "foo://b/run", "--once"]),
                                                ("trainer", ["--init-from", "http://host/run"])])
def test_an_unknown_scheme_is_refused_naming_the_ones_taken(program: str, flags: list[str], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import run_evaluator_cli, run_trainer_cli

    run = run_trainer_cli if program == "trainer" else run_evaluator_cli
    code, _, err = run(flags, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "is not a storage this program reads; give a local path, s3://bucket/prefix or gs://bucket/prefix" in err


def test_a_failed_save_that_replaced_the_only_kept_checkpoint_says_so(tmp_path: Path) -> None:
    wd = Workdir.open(tmp_path)
    saver = saver_lib.CheckpointSaver(wd, tf.train.Checkpoint(v=tf.Variable(1.0)), state=State(None, [], []),
                                      keep=1, keep_every_hours=0, anchor=0.0)
    saver.save(5)

    def disk_full(prefix: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    saver._write = disk_full  # type: ignore[method-assign]
    with pytest.raises(WorkdirIOError, match=r"saving model-10: disk full .*; the previous checkpoints are intact"):
        saver.save(10)
    # Training passes step 5 again (it resumed from an older checkpoint): model-5 goes first, then the write fails.
    with pytest.raises(WorkdirIOError) as raised:
        saver.save(5)
    assert "the earlier model-5 had been removed first" in str(raised.value)
    assert "--keep 1" in str(raised.value) and "intact" not in str(raised.value)
    assert checkpoints.read_state(open_storage(tmp_path)) is None  # what the message says
