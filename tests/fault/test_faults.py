"""Corruption, a full disk, retention pressure, concurrency, signals mid-save and hostile input."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import CheckpointError, State
from common.data.idx import read_idx
from common.errors import DataFormatError, WorkdirIOError
from common.run.ledger import Ledger
from common.storage import open_storage
from evaluator.config import EvalConfig
from evaluator.core import CheckpointEvaluator
from evaluator.loop import run_once
from tests.failing_disk import FailingDisk
from tests.helpers import (
    Recorder,
    Spy,
    checkpoint_files,
    committed_step,
    make_train_config,
    watch_beside,
)
from tests.helpers import run_trainer_cli as run_cli
from trainer import saver as saver_lib
from trainer.loop import train


def _resume(make_config: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> tuple[Recorder, str]:
    rec = Recorder()
    train(make_config(steps=80, save_every=20, keep=0), reporter=rec)
    return rec, capsys.readouterr().err


def test_truncated_newest_data_falls_back_with_warning(trained_config: Any, make_config: Callable[..., Any],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = next(trained_config.workdir.glob("model-60.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    rec, err = _resume(make_config, capsys)
    assert rec.messages[0] == "resumed from model-40 (step 40)"
    assert "skipping checkpoint model-60" in err


def test_flipped_index_bytes_fall_back_with_warning(trained_config: Any, make_config: Callable[..., Any],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    index = trained_config.workdir / "model-60.index"
    raw = bytearray(index.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 16):
        raw[i] ^= 0xFF
    index.write_bytes(bytes(raw))
    rec, err = _resume(make_config, capsys)
    assert rec.messages[0] == "resumed from model-40 (step 40)" and "skipping checkpoint model-60" in err


def test_garbage_state_file_falls_back_to_disk(trained_config: Any, make_config: Callable[..., Any],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (trained_config.workdir / "checkpoint").write_bytes(b"\x00\xffnot a state file {{{")
    rec, err = _resume(make_config, capsys)
    assert rec.messages[0] == "resumed from model-60 (step 60)"
    assert "checkpoint: unreadable state file" in err and "falling back to the checkpoints on disk" in err


def test_every_checkpoint_broken_is_an_error_not_a_fresh_start(trained_config: Any,
                                                               make_config: Callable[..., Any]) -> None:
    for data in trained_config.workdir.glob("model-*.data-*"):
        data.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint among model-60, model-40, model-20; refusing"):
        train(make_config(steps=80), reporter=Recorder())


def test_garbage_run_json_is_a_clear_error(trained_config: Any, capsys: pytest.CaptureFixture[str]) -> None:
    (trained_config.workdir / "run.json").write_text("\x00garbage")
    code, _, err = run_cli(["--workdir", str(trained_config.workdir), "--data-dir", trained_config.data_dir], capsys)
    assert code == 2 and "run.json: unreadable run file" in err


def test_state_paths_outside_the_workdir_are_refused(trained_config: Any, tiny_data: Path, tmp_path: Path,
                                                     make_config: Callable[..., Any],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for file in checkpoint_files(trained_config.workdir / "model-60"):
        shutil.copy(file, elsewhere / file.name)
    state = State(latest=str(elsewhere / "model-60"), paths=["../elsewhere/model-60", str(elsewhere / "model-60")],
                  timestamps=[1.0, 2.0])
    checkpoints.write_state(open_storage(trained_config.workdir), state)
    run_once(EvalConfig(workdir=trained_config.workdir, data_dir=str(tiny_data)))
    rows = Ledger(open_storage(trained_config.workdir)).read()
    assert len(rows) == 2 and all(r["status"] == "error" and "points outside the workdir" in r["reason"]
                                  for r in rows)
    rec, err = _resume(make_config, capsys)  # the trainer ignores them too and resumes from its own files
    assert "points outside the workdir" in err and rec.messages[0] == "resumed from model-60 (step 60)"


def test_files_respect_the_umask(make_config: Callable[..., Any], tiny_data: Path) -> None:
    old = os.umask(0o077)
    try:
        cfg = make_config(steps=20, save_every=20)
        train(cfg, reporter=Recorder())
        run_once(EvalConfig(workdir=cfg.workdir, data_dir=str(tiny_data)))
    finally:
        os.umask(old)
    loose = [str(p) for p in cfg.workdir.rglob("*") if not p.is_symlink() and stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert loose == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_full_disk_keeps_previous_checkpoints(tmp_path: Path, tiny_data: Path) -> None:
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "9m"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        # Each mlp checkpoint is about 6.4 MB (weights, EMA and Adam's two slots): the second cannot fit.
        cfg = make_train_config(tiny_data, small / "run", model="mlp", steps=100, save_every=20, keep=5)
        with pytest.raises(WorkdirIOError, match="saving model-40: disk full") as err:
            train(cfg, reporter=Recorder())
        assert err.value.exit_code == 5
        state = checkpoints.read_state(open_storage(cfg.workdir))
        assert state is not None and state.latest == "model-20" and state.paths == ["model-20"]
        assert checkpoints.check_readable_files(cfg.workdir / "model-20") is None
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_disk_full_after_the_first_save_exits_5_and_keeps_it(tmp_path: Path, tiny_data: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """As test_full_disk_keeps_previous_checkpoints, without a mount (tests/failing_disk.py); then room again."""
    workdir = tmp_path / "run"
    disk = FailingDisk(workdir, monkeypatch)
    disk.fail(errno.ENOSPC, when=(workdir / "checkpoint").exists)  # full from model-20's commit on
    args = ["--workdir", str(workdir), "--data-dir", str(tiny_data), "--model", "softmax", "--steps", "60",
            "--save-every", "20", "--keep", "5", "--progress", "plain"]
    code, _, err = run_cli(args, capsys)
    assert code == 5 and err.count("\n") == 1 and "saving model-40: disk full" in err, err
    assert any(r.startswith("write checkpoint.tmp-") for r in disk.refused)  # the state file did not fit
    storage = open_storage(workdir)
    state = checkpoints.read_state(storage)
    assert state is not None and state.paths == ["model-20"] and committed_step(storage) == 20
    disk.heal()
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "resumed from model-20 (step 20)" in out and committed_step(storage) == 60


def test_retention_pressure_with_a_slow_evaluator(tmp_path: Path, tiny_data: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / "run"
    real = CheckpointEvaluator.evaluate_snapshot

    def slow(self: CheckpointEvaluator, *args: Any, **kwargs: Any) -> Any:
        threading.Event().wait(0.05)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CheckpointEvaluator, "evaluate_snapshot", slow)
    stop, _, err, code = watch_beside(
        "trainer.cli",
        ["--workdir", str(workdir), "--data-dir", str(tiny_data), "--model", "softmax", "--steps", "150",
         "--save-every", "1", "--keep", "1", "--steps-per-loop", "1"],
        EvalConfig(workdir=workdir, data_dir=str(tiny_data), exit_when_done=True), Spy())
    assert code == 0, err
    assert stop.reason is None
    rows = Ledger(open_storage(workdir)).read()
    # A commit that retention deleted before the evaluator read it has a `skipped` row, written by the
    # trainer while the evaluator was registered, or a `gone` one if the evaluator listed it first: never both.
    assert rows and {r["status"] for r in rows} <= {"ok", "gone", "skipped"}
    assert len({r["checkpoint"] for r in rows}) == len(rows)
    assert all("--keep 1, --keep-pending 0" in r["reason"] for r in rows if r["status"] == "skipped")
    assert any(r["step"] == 150 and r["status"] == "ok" for r in rows)
    # What remains on disk is what the state file lists.
    storage = open_storage(workdir)
    state = checkpoints.read_state(storage)
    assert state is not None
    assert sorted(checkpoints.name_for(s) for s in checkpoints.on_disk(storage)) == sorted(state.paths)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_save_finishes_the_save(sig: signal.Signals, mode: str, make_config: Callable[..., Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal while a save is written (async: by the writer thread) ends the run once that save is committed."""
    real = saver_lib.CheckpointSaver.save
    calls = []

    def save_with_signal(self: saver_lib.CheckpointSaver, step: int, **kwargs: Any) -> Path:
        calls.append(step)
        if len(calls) == 1:
            os.kill(os.getpid(), sig)  # arrives while this save is in progress
        return real(self, step, **kwargs)

    monkeypatch.setattr(saver_lib.CheckpointSaver, "save", save_with_signal)
    cfg = make_config(steps=1000, save_every=20, save_mode=mode)
    result = train(cfg, reporter=Recorder())
    assert result.stopped_by == sig.name and result.final_step == 20
    assert tf.train.latest_checkpoint(str(cfg.workdir)) == str(cfg.workdir / "model-20")
    assert checkpoints.check_readable_files(cfg.workdir / "model-20") is None


def test_idx_header_claiming_10e12_images_fails_before_allocating(tmp_path: Path) -> None:
    path = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 1_000_000_000, 1000, 1000))
        f.write(b"\x00" * 1_000_000)
    with pytest.raises(DataFormatError, match=r"header claims shape .* refusing to read it"):
        read_idx(path, ndim=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), gz=st.booleans(), ndim=st.sampled_from([1, 3]))
def test_fuzz_idx_reader(tmp_path: Path, data: bytes, gz: bool, ndim: int) -> None:
    path = tmp_path / "fuzz"
    path.write_bytes(gzip.compress(data) if gz else data)
    try:
        array = read_idx(path, ndim=ndim)
    except DataFormatError as e:
        assert str(path) in str(e)
    else:
        assert array.ndim == ndim


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=300), st.builds(
    lambda a, b: f'model_checkpoint_path: "{a}"\nall_model_checkpoint_paths: "{b}"\n', st.text(max_size=30),
    st.text(max_size=30))))
def test_fuzz_state_file_reader(tmp_path: Path, text: str) -> None:
    (tmp_path / "checkpoint").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        state = checkpoints.read_state(open_storage(tmp_path))
    except CheckpointError as e:
        assert "checkpoint" in str(e)
    else:
        assert state is not None and state.latest


def test_ledger_survives_a_torn_write(trained_config: Any, tiny_data: Path) -> None:
    run_once(EvalConfig(workdir=trained_config.workdir, data_dir=str(tiny_data)))
    ledger = Ledger(open_storage(trained_config.workdir))
    before = ledger.read()
    with open(ledger.path, "a") as f:
        f.write('{"checkpoint": "model-80", "sta')
    assert ledger.read() == before
    assert json.loads(ledger.path.read_text().splitlines()[0])["checkpoint"] == "model-20"
