from __future__ import annotations

import errno
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from common.checkpoint import checkpoints
from common.distribute import Topology
from common.errors import UsageError, WorkdirIOError
from common.run.workdir import Workdir
from tests.helpers import run_evaluator_cli, run_trainer_cli
from trainer import save_modes
from trainer.saver import CheckpointSaver


def _saver(workdir: Path) -> CheckpointSaver:
    checkpoint = tf.train.Checkpoint(weights=tf.Variable(tf.zeros([8])), step=tf.Variable(0, dtype=tf.int64))
    return CheckpointSaver(Workdir.open(workdir), checkpoint, state=checkpoints.State(), keep=0, keep_every_hours=0,
                           anchor=0)


def test_a_failed_background_save_is_raised_at_the_next_save_and_at_close(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No failure goes unseen: the next save raises it before starting another; the last one is raised by close."""
    saver = _saver(tmp_path)
    real = type(saver.storage).commit_checkpoint
    full = {2, 4}

    def commit(self: Any, name: str, **kwargs: Any) -> None:
        if checkpoints.step_of(name) in full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, name, **kwargs)

    monkeypatch.setattr(type(saver.storage), "commit_checkpoint", commit)
    lines: list[str] = []
    saves = save_modes.AsyncSaves(saver, report=lines.append)
    saves.save(1)
    saves.save(2)
    with pytest.raises(WorkdirIOError, match=r"background save of step 2 failed: saving model-2: disk full"):
        saves.save(3)
    state = checkpoints.read_state(saver.storage)
    assert state is not None and state.paths == ["model-1"]  # step 3 was not started after the failure
    saves.save(3)
    saves.save(4)
    with pytest.raises(WorkdirIOError, match=r"background save of step 4 failed"):
        saves.close()
    state = checkpoints.read_state(saver.storage)
    assert state is not None and state.paths == ["model-1", "model-3"] and state.latest == "model-3"
    saves.close()  # reported once
    assert [line.split()[3] for line in lines] == ["step=1", "step=3"]


def test_one_save_in_flight_and_commits_in_step_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save waits until the previous one has committed: the state file only ever grows in step order."""
    saver = _saver(tmp_path)
    real, release, order = CheckpointSaver.save, threading.Event(), []

    def held(self: CheckpointSaver, step: int, **kwargs: Any) -> Any:
        if step == 1:
            release.wait()
        order.append(step)
        return real(self, step, **kwargs)

    monkeypatch.setattr(CheckpointSaver, "save", held)
    saves = save_modes.AsyncSaves(saver, report=lambda line: None)
    saves.save(1)
    second = threading.Thread(target=saves.save, args=(2,))
    second.start()
    second.join(0.3)
    assert second.is_alive() and order == []  # blocked behind step 1, which has not been written
    release.set()
    second.join()
    saves.close()
    assert order == [1, 2]
    state = checkpoints.read_state(saver.storage)
    assert state is not None and state.paths == ["model-1", "model-2"]


def test_collective_saves_are_sync_said_or_refused() -> None:
    multi = Topology(strategy="multi-worker", workers=2, worker=0, replicas=2, chief=True)
    single = Topology(strategy="default", workers=1, worker=0, replicas=1, chief=True)
    mode, why = save_modes.choose(None, multi)
    assert mode == "sync" and why is not None and "collective" in why
    assert save_modes.choose("sync", multi) == ("sync", None)
    with pytest.raises(UsageError, match="--save-mode async: a multi-worker save is collective"):
        save_modes.choose("async", multi)
    assert save_modes.choose(None, single) == ("async", None)
    assert save_modes.choose("sync", single) == ("sync", None)


def test_save_async_with_workers_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_trainer_cli(["--workers", "2", "--save-mode", "async", "--steps", "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--save-mode async: the saves of --workers are collective" in err


def _tensors(prefix: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(prefix))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def test_both_modes_write_the_same_checkpoints_of_a_users_model(tiny_data: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI contract: same keys and values at the same steps in both modes; `evaluator --once` reads both."""
    for mode in save_modes.SAVE_MODES:
        args = ["--workdir", str(tmp_path / mode), "--model", "tests.byo_models:keras_bn", "--steps", "30",
                "--save-every", "10", "--save-mode", mode, "--data-dir", str(tiny_data), "--progress", "plain",
                "--batch-size", "16", "--train-examples", "200"]
        code, out, err = run_trainer_cli(args, capsys)
        assert code == 0, err
        assert [line.split()[3:5] for line in out.splitlines() if " trainer saved " in line] == [
            [f"step={s}", f"mode={mode}"] for s in (10, 20, 30)]
    for step in (10, 20, 30):
        written = {mode: _tensors(tmp_path / mode / checkpoints.name_for(step)) for mode in save_modes.SAVE_MODES}
        assert sorted(written["sync"]) == sorted(written["async"]) and len(written["sync"]) > 10
        for key, value in written["sync"].items():
            np.testing.assert_array_equal(written["async"][key], value, err_msg=f"step {step}: {key}")
    for mode in save_modes.SAVE_MODES:
        code, out, err = run_evaluator_cli(["--workdir", str(tmp_path / mode), "--data-dir", str(tiny_data),
                                            "--once", "--json"], capsys)
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert {(r["checkpoint"], r["status"]) for r in rows} >= {("model-30", "ok")}
