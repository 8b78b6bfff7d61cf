"""What the evaluator must never do: delete outside the workdir, record a good checkpoint as unreadable
because of a problem of this machine, evaluate a checkpoint twice, slow down with a long ledger or a
long state file, leave lease files behind, or crash with a traceback."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import CheckpointError, State
from common.errors import WorkdirIOError
from common.layout import EVAL_DIR, lease_path
from common.run.ledger import FINGERPRINT, Ledger
from common.run.protocol import LedgerRow
from common.run.workdir import Workdir
from common.storage import local as storage_local
from common.storage import open_storage, read_best
from common.storage.local import OVERFLOW_LOGGER
from evaluator import best as best_lib
from evaluator.config import EvalConfig
from evaluator.loop import run_once, run_watch
from evaluator.rows import Row
from evaluator.session import Session
from evaluator.wakeups import Wake, watching
from tests.failing_disk import FailingDisk
from tests.helpers import Spy, checkpoint_files, contents
from tests.helpers import run_evaluator_cli as run_cli


def config(workdir: Path, tiny_data: Path, **kw: Any) -> EvalConfig:
    return EvalConfig(workdir=workdir, data_dir=str(tiny_data), **kw)


def enospc(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- deletes stay inside the workdir ---------------------------------------------------------------

def test_tampered_best_link_deletes_nothing_outside(workdir: Path, tiny_data: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("precious")
    session = Session(config(workdir, tiny_data))
    session.evaluate(session.listed()[0])
    link = workdir / EVAL_DIR / "best"
    real_best = workdir / EVAL_DIR / os.readlink(link)
    link.unlink()
    link.symlink_to(precious)  # ln -sfn /some/dir W/eval/best
    session = run_once(config(workdir, tiny_data))
    assert (precious / "thesis.txt").read_text() == "precious"
    assert os.readlink(link).startswith("best-") and read_best(open_storage(workdir)) is not None
    warnings = session.status(0)["warnings"]
    assert any(str(precious) in w and "not a best folder of this workdir" in w for w in warnings), warnings
    assert real_best.is_dir()  # kept while the link pointed elsewhere: which folder was the best was unknown


def test_clean_stale_removes_links_not_what_they_point_to(workdir: Path, tiny_data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    run_once(config(workdir, tiny_data))
    eval_dir = workdir / EVAL_DIR
    (eval_dir / "best-1-aaaaaa").symlink_to(outside)
    (eval_dir / ".snapshot-999999999-x").symlink_to(outside)
    best_lib.clean_stale(Workdir.open(workdir), warn=pytest.fail)
    assert (outside / "keep.txt").exists()
    assert not (eval_dir / "best-1-aaaaaa").is_symlink() and not (eval_dir / ".snapshot-999999999-x").is_symlink()


# --- a problem of this machine is not an unreadable checkpoint ------------------------------------

def test_snapshot_failure_is_recorded_failed_and_retried(workdir: Path, tiny_data: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(storage_local.os, "link", enospc)
        session = run_once(config(workdir, tiny_data))
    records = Ledger(open_storage(workdir)).read()
    assert {r["status"] for r in records} == {"failed"}
    assert "cannot snapshot model-20: No space left on device" in records[0]["reason"]
    assert any("3 checkpoint(s) not evaluated because of a problem here" in w for w in session.status(0)["warnings"])
    session = run_once(config(workdir, tiny_data))  # the disk has room again: evaluated now
    rows = session.rows()
    assert [(r.checkpoint, r.status) for r in rows] == [(f"model-{s}", "ok") for s in (20, 40, 60)]
    assert read_best(open_storage(workdir)) is not None
    run_once(config(workdir, tiny_data))
    assert len(Ledger(open_storage(workdir)).read()) == 6  # 3 failed + 3 ok, nothing more


def test_repeated_failures_do_not_grow_the_ledger(workdir: Path, tiny_data: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_local.os, "link", enospc)
    for _ in range(3):
        run_once(config(workdir, tiny_data))
    assert len(Ledger(open_storage(workdir)).read()) == 3


def test_failed_promotion_keeps_the_result_ok_and_is_retried(workdir: Path, tiny_data: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(storage_local.os, "rename", enospc)
        session = run_once(config(workdir, tiny_data))
    assert {r["status"] for r in Ledger(open_storage(workdir)).read()} == {"ok"}
    assert read_best(open_storage(workdir)) is None
    assert any("No space left on device" in w and "retried at the next scan" in w
               for w in session.status(0)["warnings"])
    session = run_once(config(workdir, tiny_data))  # nothing to evaluate; the promotion is caught up
    top = max(Ledger(open_storage(workdir)).read(), key=lambda r: r["accuracy"])
    assert (read_best(open_storage(workdir)) or {}).get("accuracy") == top["accuracy"]
    assert not any("could not" in w for w in session.status(0)["warnings"])
    assert len(Ledger(open_storage(workdir)).read()) == 3


def test_full_ledger_append_leaves_best_alone(workdir: Path, tiny_data: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: Ledger, records: list[Any]) -> list[Any]:
        raise WorkdirIOError(f"cannot write the ledger {self.path}: No space left on device")

    monkeypatch.setattr(Ledger, "append", full)
    with pytest.raises(WorkdirIOError):
        run_once(config(workdir, tiny_data))
    assert read_best(open_storage(workdir)) is None  # best.json never names a checkpoint the ledger does not hold


def test_ledger_write_error_is_exit_5_and_leaves_the_ledger_whole(workdir: Path, tiny_data: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run_once(config(workdir, tiny_data, policy="latest"))
    before = Ledger(open_storage(workdir)).path.read_bytes()
    (workdir / EVAL_DIR / "best").unlink()
    (workdir / EVAL_DIR / "best.json").unlink()
    monkeypatch.setattr(Ledger, "_write", lambda self, data: enospc())
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once"], capsys)
    assert code == 5 and err.count("\n") == 1
    assert err.startswith("evaluator: error: cannot write the ledger ") and "No space left on device" in err
    assert Ledger(open_storage(workdir)).path.read_bytes() == before
    assert read_best(open_storage(workdir)) is None


def _cp_rL(source: Path, target: Path) -> Path:
    """Copy a workdir as `cp -rL` does: every link replaced by what it points to."""
    return Path(shutil.copytree(source, target, symlinks=False))


def test_best_folder_from_a_copied_workdir_is_adopted(workdir: Path, tiny_data: Path, tmp_path: Path) -> None:
    session = Session(config(workdir, tiny_data))
    session.evaluate(session.listed()[0])
    copy = _cp_rL(workdir, tmp_path / "copied")
    best_dir = copy / EVAL_DIR / "best"
    assert best_dir.is_dir() and not best_dir.is_symlink()
    notes: list[str] = []
    best_lib.clean_stale(Workdir.open(copy), warn=notes.append)
    assert best_dir.is_symlink() and (copy / EVAL_DIR / "best.json").is_symlink()
    assert (best_dir / "model-20.index").exists() and (read_best(open_storage(copy)) or {})["checkpoint"] == "model-20"
    assert [p.name for p in (copy / EVAL_DIR).glob("best-*")] == [os.readlink(best_dir)]
    assert any("was a folder, not a link" in n for n in notes)


def test_copied_workdir_keeps_recording_improvements(workdir: Path, tiny_data: Path, tmp_path: Path) -> None:
    session = Session(config(workdir, tiny_data))
    session.evaluate(session.listed()[0])
    copy = _cp_rL(workdir, tmp_path / "copied")
    for path in (copy / EVAL_DIR / "best" / "best.json", copy / EVAL_DIR / "best.json"):
        path.write_text(json.dumps(json.loads(path.read_text()) | {"accuracy": 0.0}))  # any result improves
    # Only what promote meets matters here: skip the start-up clean that adopts the folder first.
    session = Session(config(copy, tiny_data))
    for cand in session.pending(session.listed()):
        session.evaluate(cand)
    assert {r["status"] for r in Ledger(open_storage(copy)).read()} == {"ok"}
    entry = read_best(open_storage(copy))
    assert entry is not None and entry["accuracy"] > 0.0
    assert (copy / EVAL_DIR / "best").is_symlink()


# --- matching by content, not by commit time --------------------------------------------------------

def _rebuild_state_from_disk(workdir: Path) -> None:
    """What the trainer does with a garbage state file: list the files on disk, index mtimes as times."""
    names = [checkpoints.name_for(s) for s in checkpoints.on_disk(open_storage(workdir))]
    stamps = [(workdir / f"{n}.index").stat().st_mtime + 1000 for n in names]
    checkpoints.write_state(open_storage(workdir), State(latest=names[-1], paths=names, timestamps=stamps))


def test_rebuilt_state_file_evaluates_nothing_again(workdir: Path, tiny_data: Path) -> None:
    run_once(config(workdir, tiny_data))
    assert all(FINGERPRINT in r for r in Ledger(open_storage(workdir)).read())
    _rebuild_state_from_disk(workdir)
    session = run_once(config(workdir, tiny_data))
    assert len(Ledger(open_storage(workdir)).read()) == 3
    assert [r.checkpoint for r in session.rows()] == ["model-20", "model-40", "model-60"]


def test_checkpoint_rewritten_under_its_name_is_evaluated_again(workdir: Path, tiny_data: Path) -> None:
    run_once(config(workdir, tiny_data))
    for file in checkpoint_files(workdir / "model-60"):
        shutil.copyfile(file, workdir / file.name.replace("model-60", "model-40"))
    session = Session(config(workdir, tiny_data))
    assert [c.name for c in session.pending(session.listed())] == ["model-40"]


def test_old_rows_without_fingerprint_still_match(workdir: Path, tiny_data: Path) -> None:
    run_once(config(workdir, tiny_data))
    ledger = Ledger(open_storage(workdir))
    old = [{k: v for k, v in r.items() if k != FINGERPRINT} for r in ledger.read()]
    ledger.path.write_text("".join(json.dumps(r) + "\n" for r in old))
    session = Session(config(workdir, tiny_data))
    assert session.pending(session.listed()) == []


# --- the ledger: appends in place, reads what is new, tolerates bad bytes ----------------------------

def _row(i: int) -> LedgerRow:
    return LedgerRow({"checkpoint": f"model-{i}", FINGERPRINT: f"1:{i:08x}", "committed": 1.0, "split": "validation",
                      "weights": "ema", "status": "ok", "accuracy": 0.5})


def test_ledger_appends_in_place(tmp_path: Path) -> None:
    ledger = Ledger(open_storage(tmp_path))
    ledger.append([_row(i) for i in range(2000)])
    before = ledger.path.read_bytes()
    inode = ledger.path.stat().st_ino
    assert ledger.append([_row(2000)]) == [_row(2000)]
    after = ledger.path.read_bytes()
    assert ledger.path.stat().st_ino == inode and after.startswith(before)
    assert after[len(before):] == json.dumps(_row(2000).to_json(), sort_keys=True).encode() + b"\n"


def test_two_ledger_readers_dedupe_under_the_lock(tmp_path: Path) -> None:
    first, second = Ledger(open_storage(tmp_path)), Ledger(open_storage(tmp_path))
    assert second.read() == []
    assert first.append([_row(1)]) == [_row(1)]
    assert second.append([_row(1), _row(2)]) == [_row(2)]  # sees the other's row appended since it last read
    assert [r["checkpoint"] for r in first.read()] == ["model-1", "model-2"]


def test_append_after_a_torn_line_keeps_the_new_row(tmp_path: Path) -> None:
    ledger = Ledger(open_storage(tmp_path))
    ledger.append([_row(1)])
    with open(ledger.path, "ab") as f:
        f.write(b'{"checkpoint": "model-9", "sta')
    ledger.append([_row(2)])
    fresh = Ledger(open_storage(tmp_path))
    assert [r["checkpoint"] for r in fresh.read()] == ["model-1", "model-2"] and fresh.skipped == 1


def test_non_utf8_ledger_line_is_skipped_and_reported(workdir: Path, tiny_data: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run_once(config(workdir, tiny_data))
    with open(Ledger(open_storage(workdir)).path, "ab") as f:
        f.write(b'{"checkpoint": "caf\xe9"}\n')
    code, out, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once"], capsys)
    assert code == 0 and "skipped 1 unreadable" in out, err
    code, out, err = run_cli(["report", "--workdir", str(workdir), "--data-dir", str(tiny_data)], capsys)
    assert code == 0 and "skipped 1 unreadable line(s)" in err and "Traceback" not in err


# --- hostile state files --------------------------------------------------------------------------

def test_10004_entry_state_file_real_checkpoints_first(workdir: Path, tiny_data: Path) -> None:
    state = checkpoints.read_state(open_storage(workdir))
    assert state is not None
    junk = [f"model-{100000 + i}" for i in range(10_000)] + ["../../etc/model-1"]
    paths = junk + state.paths
    stamps = [1.0 + i for i in range(len(junk))] + state.timestamps  # the junk was "committed" first
    checkpoints.write_state(open_storage(workdir), State(latest=state.latest, paths=paths, timestamps=stamps))
    session = run_once(config(workdir, tiny_data))
    records = Ledger(open_storage(workdir)).read()
    assert [r["checkpoint"] for r in records[:3]] == ["model-20", "model-40", "model-60"]
    assert {r["status"] for r in records[:3]} == {"ok"}
    statuses = {r["checkpoint"]: r["status"] for r in records[3:]}
    assert len(statuses) == 10_001 and statuses["model-100000"] == "gone" and statuses["model-1"] == "error"
    assert session.pending(session.listed()) == []


@pytest.mark.parametrize(("limit", "value", "message"), [
    ("MAX_STATE_BYTES", 1000, "state file larger than"),
    ("MAX_STATE_ENTRIES", 100, "state file lists 300 checkpoints"),
])
def test_absurd_state_file_is_refused(limit: str, value: int, message: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"model-{i}" for i in range(300)]
    checkpoints.write_state(open_storage(tmp_path), State(latest=names[-1], paths=names, timestamps=[1.0] * 300))
    monkeypatch.setattr(checkpoints, limit, value)
    with pytest.raises(CheckpointError, match=message):
        checkpoints.read_state(open_storage(tmp_path))


# --- one-line errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["inf", "1e300", "nan", "86401"])
def test_absurd_intervals_exit_2(value: str, workdir: Path, tiny_data: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--rescan-secs", "--poll-secs"):
        code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), flag, value], capsys)
        assert code == 2 and err.count("\n") == 1 and f"{flag} (" in err and "at most 86400" in err


def test_workdir_that_is_a_file_exit_2(tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a workdir")
    for flags in ([], ["--once"]):
        code, _, err = run_cli(["--workdir", str(afile), "--data-dir", str(tiny_data), *flags], capsys)
        assert code == 2 and err.count("\n") == 1 and "this is a file, not a folder" in err


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_workdir_exit_5(workdir: Path, tiny_data: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    with _tmpfs(tmp_path / "mnt", "20m") as mnt:
        copy = Path(shutil.copytree(workdir, mnt / "run"))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        code, _, err = run_cli(["--workdir", str(copy), "--data-dir", str(tiny_data), "--once"], capsys)
    assert code == 5 and err.count("\n") == 1 and "Read-only file system" in err, err


def test_full_disk_exit_5(workdir: Path, tiny_data: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    with _tmpfs(tmp_path / "mnt", "20m") as mnt:
        copy = Path(shutil.copytree(workdir, mnt / "run"))
        with open(mnt / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        code, _, err = run_cli(["--workdir", str(copy), "--data-dir", str(tiny_data), "--once"], capsys)
        assert code == 5 and err.count("\n") == 1 and "No space left on device" in err, err
        (mnt / "filler").unlink()
        code, _, err = run_cli(["--workdir", str(copy), "--data-dir", str(tiny_data), "--once"], capsys)
        assert code == 0, err
        assert {r["status"] for r in Ledger(open_storage(copy)).read()} == {"ok"}


# --- the same promises on a disk that fails in this process: no mount, no root (tests/failing_disk.py) --

ALL_OK = [(f"model-{step}", "ok") for step in (20, 40, 60)]


def _failing_once(workdir: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str], error: int, **fail: Any) -> tuple[str, list[str]]:
    """Run `evaluator --once` on a disk failing with `error` (`fail`: see FailingDisk.fail), which must exit 5.

    Returns the one line it printed and what the disk refused; the disk works again afterwards.
    """
    disk = FailingDisk(workdir, monkeypatch)
    disk.fail(error, **fail)
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once"], capsys)
    disk.heal()
    assert code == 5 and err.count("\n") == 1 and os.strerror(error) in err, err
    return err, disk.refused


def _once(workdir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> list[tuple[str, str]]:
    """Run `evaluator --once`, which must exit 0; return the ledger's (checkpoint, status) pairs."""
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once"], capsys)
    assert code == 0, err
    return [(r["checkpoint"], r["status"]) for r in Ledger(open_storage(workdir)).read()]


def _evaluate_the_first(workdir: Path, tiny_data: Path) -> None:
    """Evaluate model-20 alone: the ledger holds its row and it is the best; model-40 and -60 are still to do."""
    session = Session(config(workdir, tiny_data))
    session.evaluate(session.listed()[0])


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES], ids=errno.errorcode.get)
def test_unwritable_disk_exit_5_and_nothing_changes(error: int, workdir: Path, tiny_data: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """As test_read_only_workdir_exit_5; then the same workdir, writable again, is evaluated."""
    before = contents(workdir)
    _, refused = _failing_once(workdir, tiny_data, monkeypatch, capsys, error)
    assert refused and contents(workdir) == before
    assert _once(workdir, tiny_data, capsys) == ALL_OK


def test_full_disk_exit_5_loses_nothing_and_room_again_evaluates(workdir: Path, tiny_data: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """As test_full_disk_exit_5, with a ledger and a best checkpoint on disk that must come through whole."""
    _evaluate_the_first(workdir, tiny_data)
    before = contents(workdir)
    _, refused = _failing_once(workdir, tiny_data, monkeypatch, capsys, errno.ENOSPC)
    assert refused and contents(workdir) == before  # nor a half-written lease or temp file left behind
    assert _once(workdir, tiny_data, capsys) == ALL_OK


def test_disk_full_in_the_middle_of_a_ledger_row_leaves_the_ledger_whole(workdir: Path, tiny_data: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The disk fills 40 bytes into the new row: the ledger is cut back to its rows and best.json stays."""
    _evaluate_the_first(workdir, tiny_data)  # model-40, next, is better (0.66 against 0.48): best.json would move
    ledger, best = workdir / EVAL_DIR / "results.jsonl", workdir / EVAL_DIR / "best.json"
    rows, entry = ledger.read_bytes(), best.read_bytes()
    err, refused = _failing_once(workdir, tiny_data, monkeypatch, capsys, errno.ENOSPC,
                                 only=f"{EVAL_DIR}/results.jsonl", room=40)
    assert err.startswith("evaluator: error: cannot write the ledger ")
    assert refused == [f"write {EVAL_DIR}/results.jsonl"]
    assert ledger.read_bytes() == rows and best.read_bytes() == entry
    assert _once(workdir, tiny_data, capsys) == ALL_OK and ledger.read_bytes().startswith(rows)


# --- leases and lost events ---------------------------------------------------------------------------

def test_dead_evaluators_leases_are_removed(workdir: Path, tiny_data: Path) -> None:
    dead = lease_path(workdir, "model-20", 999_999_999)
    dead.parent.mkdir(parents=True)
    dead.write_text(socket.gethostname() + "\n")
    legacy = lease_path(workdir, "model-40", 999_999_998)
    legacy.touch()  # leases of earlier versions are empty
    remote = lease_path(workdir, "model-60", 999_999_997)
    remote.write_text("another-machine\n")
    alive = lease_path(workdir, "model-20", os.getpid())
    alive.write_text(socket.gethostname() + "\n")
    run_once(config(workdir, tiny_data, policy="latest"))
    assert not dead.exists() and not legacy.exists()
    assert remote.exists() and alive.exists()


def test_inotify_overflow_wakes_the_loop_in_our_format(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    wake = Wake()
    with caplog.at_level(logging.WARNING), watching(open_storage(tmp_path), wake, poll=False):
        logging.getLogger(OVERFLOW_LOGGER).warning("Inotify queue overflowed; filesystem events were lost")
    assert wake.event.is_set() and wake.take_overflows() == 1
    assert "overflowed" not in caplog.text and "overflowed" not in capsys.readouterr().err


class Messages(Spy):
    """A display that also keeps its messages; it injects one overflow, then stops once it is reported."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.stopper: Any = None

    def update(self, rows: list[Row], status: dict[str, Any]) -> None:
        super().update(rows, status)
        if len(self.statuses) == 1:
            logging.getLogger(OVERFLOW_LOGGER).warning("Inotify queue overflowed; filesystem events were lost")
        if self.messages:
            self.stopper.set("test")

    def message(self, text: str) -> None:
        self.messages.append(text)


def test_watch_loop_reports_an_overflow_and_rescans(workdir: Path, tiny_data: Path) -> None:
    from common.signals import StopRequest

    display, stop = Messages(), StopRequest()
    display.stopper = stop
    run_watch(config(workdir, tiny_data, rescan_secs=60), display, stop)
    (line,) = display.messages
    assert " evaluator warning message=" in line and "inotify queue overflowed" in line
    assert any("inotify queue overflowed" in w for w in display.statuses[-1]["warnings"])


def test_table_shows_only_the_newest_gone_rows() -> None:
    from rich.console import Console

    from evaluator.display import MAX_GONE_ROWS, render_table

    rows = [Row(step=i, checkpoint=f"model-{i}", status="gone", reason="gone") for i in range(MAX_GONE_ROWS + 50)]
    rows.append(Row(step=10**6, checkpoint="model-1000000", status="ok", accuracy=0.5))
    console = Console(width=200, record=True)
    console.print(render_table(rows))
    text = console.export_text()
    assert "50 earlier gone or skipped rows not shown" in text and "model-1000000" in text
    assert "model-49 " not in text and f"model-{MAX_GONE_ROWS + 49} " in text


def test_help_names_every_exit_code_and_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from evaluator import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    assert done.value.code == 0
    for code in ("0 done", "2 bad input", "4 no data", "5 its files", "6 another process"):
        assert code in out, code
    for command in cli.SUBCOMMANDS:
        assert command == "watch" or f"'evaluator {command} --help'" in out, command
