"""The storage seam's contract: what every implementation of `common.storage.Storage` must do.

The contract tests take a `storage` fixture, which yields each implementation on a fresh, empty
workdir: a local folder, and a bucket of the S3 server and of the GCS emulator (`tests/cloud.py`).
Tests of mechanisms only a local folder has (links pointing out, hard links) follow at the end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import UsageError
from common.storage import Gone, Locked, Storage, open_storage
from common.storage import local as storage_local
from common.storage.local import LocalStorage
from common.storage.paths import OutsideError
from tests.failing_disk import FailingDisk
from tests.helpers import commit_model_5

INDEX, DATA = "model-5.index", "model-5.data-00000-of-00001"


@pytest.fixture(params=["local", *(pytest.param(scheme, marks=pytest.mark.cloud) for scheme in ("s3", "gs"))])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """A fresh, empty workdir behind each implementation: a local folder, and a new bucket of each store."""
    if request.param != "local":
        cloud = request.getfixturevalue("cloud")  # the servers on 127.0.0.1 (skipped with the reason if absent)
        return open_storage(f"{request.param}://{cloud.new_bucket(request.param)}/run")
    (tmp_path / "run").mkdir()  # a local workdir exists before anything is written into it
    return open_storage(tmp_path / "run")


@contextlib.contextmanager
def child_holding(storage: Storage, what: str) -> Iterator[subprocess.Popen[str]]:
    """Another process that holds `what` (`lock` or `lease`) on this workdir until killed or told to stop."""
    hold = {"lock": 's.lock("trainer.lock", wait=False, note="held by the child")', "lease": 's.lease("model-5")'}
    code = ("import sys\nfrom common.storage import open_storage\ns = open_storage(sys.argv[1])\n"
            f"with {hold[what]}:\n    print('held', flush=True)\n    sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code, storage.root], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    with child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "held\n"
            yield child
        finally:
            child.kill()


# --- the contract ---------------------------------------------------------------------------------

def test_read_of_an_absent_key_is_none(storage: Storage) -> None:
    assert storage.read("checkpoint") is None
    assert storage.read_from("eval/results.jsonl", 0) is None
    assert storage.stat("model-5.index") is None
    assert storage.names("eval") == [] and storage.checkpoint_files("model-5") == []


def test_write_then_read_stat_and_names(storage: Storage) -> None:
    storage.write("heartbeat.json", b"{}\n")
    storage.write("run.json", b'{"a": 1}\n')
    assert storage.read("run.json") == b'{"a": 1}\n' and storage.read("run.json", limit=3) == b'{"a'
    stat = storage.stat("run.json")
    assert stat is not None and stat.size == 9
    storage.write("run.json", b'{"a": 22}\n')
    changed = storage.stat("run.json")
    assert changed is not None and changed.size == 10 and changed.token != stat.token
    assert storage.names() == ["heartbeat.json", "run.json"]  # no temp object left visible
    assert storage.names("", "r*") == ["run.json"]


def test_atomic_write_never_shows_a_partial_object(storage: Storage) -> None:
    """A reader racing a writer sees one whole version or the other, every time."""
    versions = (b"a" * 300_000, b"b" * 200_000)
    storage.write("checkpoint", versions[0])
    done = threading.Event()

    def writer() -> None:
        for i in range(40):
            storage.write("checkpoint", versions[i % 2])
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    try:
        while not done.is_set():
            data = storage.read("checkpoint")
            assert data in versions, f"a partial object of {len(data or b'')} bytes was visible"
            seen.add(data)
    finally:
        thread.join()
    assert storage.names() == ["checkpoint"] and seen


def test_append_and_read_from_an_offset(storage: Storage) -> None:
    storage.append("eval/results.jsonl", b'{"n": 1}\n')
    first = storage.stat("eval/results.jsonl")
    storage.append("eval/results.jsonl", b'{"n": 2}\n')
    read = storage.read_from("eval/results.jsonl", 9)
    assert read is not None and read[1] == b'{"n": 2}\n' and read[0].size == 18
    assert first is not None and read[0].origin == first.origin  # appended to, not replaced
    storage.write("eval/results.jsonl", b"")
    replaced = storage.stat("eval/results.jsonl")
    assert replaced is not None and replaced.origin != first.origin


def test_delete_removes_a_key_or_a_folder_and_refuses_keys_outside(storage: Storage, tmp_path: Path) -> None:
    commit_model_5(storage)
    storage.append("eval/best-5-abc/model-5.index", b"x")
    storage.delete("eval/best-5-abc")
    storage.delete(INDEX)
    storage.delete("never-was")  # a missing key is fine
    assert storage.names("eval") == [] and storage.checkpoint_files("model-5") == [DATA]
    (tmp_path / "precious").write_bytes(b"keep")
    for key in ("../precious", "/etc/passwd", "eval//x", ""):
        with pytest.raises((ValueError, OutsideError)):
            storage.delete(key)
    assert (tmp_path / "precious").read_bytes() == b"keep"


def test_commit_makes_the_state_file_the_commit_point(storage: Storage) -> None:
    storage.write("checkpoint", b'model_checkpoint_path: "model-1"\n')
    target = storage.checkpoint_target("model-5")
    Path(f"{target}.index").write_bytes(b"index-bytes")
    Path(f"{target}.data-00000-of-00001").write_bytes(b"data")
    assert storage.read("checkpoint") == b'model_checkpoint_path: "model-1"\n'  # not committed yet
    storage.commit_checkpoint("model-5", state_key="checkpoint", state=b'model_checkpoint_path: "model-5"\n')
    assert storage.read("checkpoint") == b'model_checkpoint_path: "model-5"\n'
    assert storage.checkpoint_files("model-5") == [DATA, INDEX]
    assert storage.read(INDEX) == b"index-bytes" and storage.read(DATA) == b"data"


def test_pin_is_a_private_copy_that_outlives_a_delete(storage: Storage) -> None:
    commit_model_5(storage)
    with storage.pin("model-5") as private:
        for key in storage.checkpoint_files("model-5"):
            storage.delete(key)
        assert Path(f"{private}.index").read_bytes() == b"index-bytes"
        assert Path(f"{private}.data-00000-of-00001").read_bytes() == b"data" * 1000
    assert not Path(f"{private}.index").exists()  # removed on exit
    assert storage.names("eval") == []


def test_pin_of_a_deleted_checkpoint_is_gone(storage: Storage) -> None:
    commit_model_5(storage)
    storage.delete(INDEX)
    with pytest.raises(Gone, match=r"model-5\.index is gone"), storage.pin("model-5"):
        pass


def test_lock_is_exclusive_between_processes_and_freed_by_a_kill(storage: Storage) -> None:
    with child_holding(storage, "lock") as child:
        with pytest.raises(Locked, match="held by the child"), storage.lock("trainer.lock", wait=False):
            pass
        child.send_signal(signal.SIGKILL)
        child.wait()
    with storage.lock("trainer.lock", wait=False, note="ours"):
        pass


def test_a_discarded_lock_is_gone_after_release_and_exclusive_while_held(storage: Storage) -> None:
    key = "eval/claims/model-5"
    with storage.lock(key, wait=False, note="first", discard=True), \
            pytest.raises(Locked, match="first"), storage.lock(key, wait=False, discard=True):
        pass
    assert storage.names("eval/claims") == []  # claims taken once per checkpoint do not pile up
    with storage.lock(key, wait=False, note="second", discard=True):  # a new holder gets the name's new file
        assert b"second" in (storage.read(key) or b"")
    assert storage.names("eval/claims") == []


def test_a_zombie_is_not_alive(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        pass  # exited, not yet reaped: a killed evaluator whose parent has not waited for it
    assert not storage_local.pid_alive(child.pid)
    assert storage_local.pid_alive(os.getpid())
    child.wait()
    assert not storage_local.pid_alive(child.pid)


def test_a_lease_counts_while_its_holder_lives_and_a_dead_ones_is_ignored(storage: Storage) -> None:
    with child_holding(storage, "lease") as child:
        assert storage.leased() == {"model-5"}
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert storage.leased() == set()
    assert storage.clean_readers() == []
    with storage.lease("model-9"):
        assert storage.leased() == {"model-9"}
    assert storage.leased() == set()


@pytest.mark.parametrize("poll", [False, True])
def test_the_notifier_fires_on_a_state_file_commit(storage: Storage, poll: bool) -> None:
    changed = threading.Event()
    with storage.watch({"checkpoint"}, changed.set, on_lost=changed.set, poll=poll, poll_secs=0.1):
        commit_model_5(storage)
        assert changed.wait(30), "no notice of the committed state file"


def test_pointer_switches_atomically(storage: Storage) -> None:
    storage.append("eval/best-5-a/best.json", b"{}")
    storage.append("eval/best-9-b/best.json", b"{}")
    assert storage.pointer("eval/best") is None
    storage.point("eval/best", "best-5-a")
    storage.point("eval/best", "best-9-b")
    assert storage.pointer("eval/best") == "best-9-b"
    assert storage.names("eval") == ["best", "best-5-a", "best-9-b"]


def test_a_url_of_another_scheme_is_refused_in_one_line() -> None:
    for url in ("http://host/run", "file:///tmp/run"):
        with pytest.raises(UsageError, match=r"--workdir '.+': a workdir is a local folder, s3://bucket/prefix or gs://"):
            open_storage(url)


@pytest.mark.cloud
def test_a_missing_bucket_is_refused_in_one_line(cloud: object) -> None:
    for url in ("s3://no-such-bucket/run", "gs://no-such-bucket/run"):
        with pytest.raises(UsageError, match=r"the bucket 'no-such-bucket' does not exist \(create it first\)"):
            open_storage(url)


# --- what only a local folder has -----------------------------------------------------------------

def test_local_delete_refuses_a_link_that_points_outside(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "model-5.index").write_bytes(b"not ours")
    (tmp_path / "run" / "eval").symlink_to(tmp_path / "outside")
    with pytest.raises(OutsideError, match=r"refused to delete .*: it is not inside"):
        storage.delete("eval/model-5.index")
    storage.delete("eval")  # the link itself goes, never what it points to
    assert (tmp_path / "outside" / "model-5.index").read_bytes() == b"not ours"


def test_local_delete_of_a_folder_raises_what_it_cannot_delete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path)
    (tmp_path / "eval" / "report-5").mkdir(parents=True)
    (tmp_path / "eval" / "report-5" / "a.json").write_text("{}")
    real_unlink = os.unlink

    def refuse(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(path).endswith("a.json"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse)  # as a file of another user in a sticky folder would (tests run as root)
    with pytest.raises(PermissionError):
        storage.delete("eval/report-5")
    monkeypatch.undo()
    assert (tmp_path / "eval" / "report-5" / "a.json").exists()  # said, not ignored


def test_local_pins_of_another_host_outlive_a_clean(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    here = socket.gethostname()
    names = [".snapshot-999999999-a", f".snapshot-999999999-b@{here}", ".snapshot-999999999-c@other-host"]
    for name in names:  # pid 999999999 is dead here; on the other host (a shared filesystem) it may be live
        (tmp_path / "eval" / name).mkdir(parents=True)
    assert storage.clean_readers() == []
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [".snapshot-999999999-c@other-host"]


def test_local_pin_is_gone_when_a_file_vanishes_mid_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path)
    commit_model_5(storage)
    real_link = os.link

    def retention_first(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if os.fspath(src).endswith(".index"):
            os.unlink(src)  # the trainer's retention, between the listing and the link
        real_link(src, dst)

    monkeypatch.setattr(storage_local.os, "link", retention_first)
    with pytest.raises(Gone, match=r"model-5\.index was deleted while being read"), storage.pin("model-5"):
        pass
    assert storage.names("eval") == []  # the private folder went too


def test_local_pin_is_gone_when_a_file_is_replaced_mid_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path)
    commit_model_5(storage)
    real_link = os.link

    def rewrite_after(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_link(src, dst)
        if os.fspath(src).endswith(".index"):
            os.unlink(src)
            Path(src).write_bytes(b"another version")  # deleted, then rewritten under the same name

    monkeypatch.setattr(storage_local.os, "link", rewrite_after)
    with pytest.raises(Gone, match=r"model-5\.index was replaced while being read"), storage.pin("model-5"):
        pass


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS], ids=errno.errorcode.get)
@pytest.mark.parametrize("operation", ["write", "append"])
def test_local_write_or_append_that_fails_leaves_the_old_content(operation: str, error: int, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path)
    change = getattr(storage, operation)
    change("results.jsonl", b'{"n": 1}\n')
    disk = FailingDisk(tmp_path, monkeypatch)
    disk.fail(error, room=4)  # a full disk takes the first 4 bytes, then refuses
    with pytest.raises(OSError) as raised:
        change("results.jsonl", b'{"n": 2}\n')
    assert raised.value.errno == error and disk.refused
    assert storage.read("results.jsonl") == b'{"n": 1}\n' and storage.names() == ["results.jsonl"]  # no temp file
    disk.heal()
    change("results.jsonl", b'{"n": 2}\n')
    assert storage.read("results.jsonl") == {"write": b"", "append": b'{"n": 1}\n'}[operation] + b'{"n": 2}\n'
