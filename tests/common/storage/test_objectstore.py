"""The object-store workdir's primitives, against a real S3 server (moto) and a GCS emulator (fake-gcs-server).

Each test runs on a fresh bucket of each store (`bucket_workdir`). Faults are made by the servers
(a proxy that answers 503) or by the store's own client (a library call that deletes an object
first); nothing of `common/storage/objectstore.py` is replaced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.errors import UsageError
from common.storage import Gone, Locked, Storage
from common.storage.bucket import Bucket, BucketURL, filesystem
from common.storage.objectstore import FOLD_AT, Holder, ObjectStorage
from tests.cloud import FlakyProxy, Servers
from tests.helpers import commit_files, commit_model_5, committed_step

pytestmark = pytest.mark.cloud
INDEX, DATA = "model-5.index", "model-5.data-00000-of-00001"


@pytest.fixture
def store(bucket_workdir: str) -> ObjectStorage:
    return ObjectStorage(bucket_workdir)


def test_commit_uploads_verifies_then_writes_the_state_file(store: ObjectStorage) -> None:
    staged = Path(store.checkpoint_target("model-5")).parent  # where the commit below stages its files
    commit_files(store, "model-5", {".index": b"index-bytes", ".data-00000-of-00001": os.urandom(3 << 20)})
    assert store.names() == ["checkpoint", DATA, INDEX]  # the layout of a local workdir, nothing else
    assert store.read("checkpoint") == b'model_checkpoint_path: "model-5"\n'
    assert store.checkpoint_files("model-5") == [DATA, INDEX]
    assert not staged.exists()  # the staged copy and its folder went once committed (no leftover to report)
    with store.pin("model-5") as private:  # a streamed download of a 3 MiB object, then a ranged read
        assert Path(f"{private}.data-00000-of-00001").stat().st_size == 3 << 20
        data = Path(f"{private}.data-00000-of-00001").read_bytes()
    read = store.read_from(DATA, 1000)
    assert read is not None and read[1] == data[1000:] and read[0].size == 3 << 20


def test_a_commit_without_its_index_writes_no_state_file(store: ObjectStorage) -> None:
    Path(f"{store.checkpoint_target('model-5')}.data-00000-of-00001").write_bytes(b"data")
    with pytest.raises(OSError, match="no checkpoint was written"):
        store.commit_checkpoint("model-5", state_key="checkpoint", state=b"x")
    assert store.read("checkpoint") is None


def test_a_commit_uploads_its_data_at_once_and_its_index_last(store: ObjectStorage,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill during the uploads never leaves an index without its data (trainer/orphans.py relies on it)."""
    events: list[tuple[str, str]] = []
    real = store.bucket.upload

    def slow_upload(key: str, local: Any) -> None:
        events.append(("start", key))
        real(key, local)
        if key != INDEX:
            time.sleep(0.2)  # a data file takes its time: an index started beside it would start first
        events.append(("end", key))

    monkeypatch.setattr(store.bucket, "upload", slow_upload)
    shards = {f".data-0000{i}-of-00003": os.urandom(1024) for i in range(3)}
    commit_files(store, "model-5", {".index": b"index-bytes", **shards})
    starts = [key for event, key in events if event == "start"]
    assert sorted(starts[:3]) == [f"model-5{suffix}" for suffix in sorted(shards)]
    ends = [events.index(("end", f"model-5{suffix}")) for suffix in shards]
    assert max(events.index(("start", f"model-5{suffix}")) for suffix in shards) < min(ends)  # all three at once
    assert events.index(("start", INDEX)) > max(ends)


def test_a_lock_the_store_will_not_release_is_a_warning(store: ObjectStorage, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """An outage at the release never replaces the error that ends the block; the lock frees itself later."""
    def outage(key: str) -> Any:
        raise OSError(errno.EIO, "checking failed 8 times: Service Unavailable")

    with pytest.raises(ZeroDivisionError), caplog.at_level(logging.WARNING), \
            store.lock("trainer.lock", wait=False, note="{}"):
        monkeypatch.setattr(store.bucket, "head", outage)
        raise ZeroDivisionError
    assert any("cannot release" in r.getMessage() and "trainer.lock" in r.getMessage() for r in caplog.records)


def test_a_missing_bucket_is_a_one_line_usage_error(cloud: Servers) -> None:
    for url in ("s3://no-such-bucket-here/run", "gs://no-such-bucket-here/run"):
        with pytest.raises(UsageError, match=r"the bucket 'no-such-bucket-here' does not exist \(create it first\)"):
            Bucket(BucketURL.parse(url)).check_bucket()


def test_listing_sees_every_write_and_delete_at_once(store: ObjectStorage) -> None:
    for i in range(12):
        store.write(f"eval/x-{i:02d}", b"x")
        assert len(store.names("eval")) == i + 1
    store.delete("eval")
    assert store.names("eval") == [] and store.names() == []


def test_the_token_changes_with_every_write_and_nothing_else(store: ObjectStorage) -> None:
    tokens = []
    for i in range(3):
        store.write("checkpoint", f'model_checkpoint_path: "model-{i}"\n'.encode())
        stat = store.stat("checkpoint")
        assert stat is not None and stat == store.stat("checkpoint")  # a poll that finds no change
        tokens.append(stat.token)
    assert len(set(tokens)) == 3


def test_appends_are_one_object_each_and_two_writers_lose_nothing(store: ObjectStorage) -> None:
    """Two threads append 20 lines each, concurrently: every line is there exactly once, whole."""

    def writer(tag: str) -> None:
        other = ObjectStorage(store.root)  # its own connection, as another evaluator would have
        for i in range(20):
            other.append("eval/results.jsonl", json.dumps({"w": tag, "i": i}).encode() + b"\n")

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = store.read("eval/results.jsonl")
    assert data is not None
    rows = [json.loads(line) for line in data.splitlines()]
    assert sorted((r["w"], r["i"]) for r in rows) == [(w, i) for w in "ab" for i in range(20)]
    assert store.names("eval") == ["results.jsonl"]  # the parts folder is not a workdir entry


def test_a_reader_gets_each_appended_part_once(store: ObjectStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        store.append("eval/results.jsonl", f"{i}\n".encode())
    fetched: list[str] = []
    real_get = store._get

    def counting_get(key: str, *args: Any, **kwargs: Any) -> bytes | None:
        fetched.append(key)
        return real_get(key, *args, **kwargs)

    monkeypatch.setattr(store, "_get", counting_get)
    assert store.read("eval/results.jsonl") == b"0\n1\n2\n3\n4\n"
    assert len(fetched) == 5
    store.append("eval/results.jsonl", b"5\n")
    other = ObjectStorage(store.root)  # a reader of its own
    other.append("eval/results.jsonl", b"6\n")
    assert store.read("eval/results.jsonl") == b"0\n1\n2\n3\n4\n5\n6\n"
    assert len(fetched) == 7  # the two new parts only: a part is never rewritten


def test_a_reader_folds_many_parts_and_other_readers_see_the_same_bytes(store: ObjectStorage) -> None:
    for i in range(FOLD_AT + 3):
        store.append("eval/results.jsonl", f"{i}\n".encode())
    before = store.read_from("eval/results.jsonl", 0)  # this read folds
    parts = store.names("eval/.results.jsonl.parts", hidden=True)
    assert len(parts) < FOLD_AT and any(p.endswith(".folded") for p in parts)
    after = store.read_from("eval/results.jsonl", 0)
    expected = b"".join(f"{i}\n".encode() for i in range(FOLD_AT + 3))
    assert before is not None and after is not None
    assert before[1] == after[1] == expected and before[0].origin == after[0].origin
    store.append("eval/results.jsonl", b"last\n")
    tail = store.read_from("eval/results.jsonl", len(expected))
    assert tail is not None and tail[1] == b"last\n"


def test_a_pointer_is_followed_by_read(store: ObjectStorage) -> None:
    store.write("eval/best-5-a/best.json", b'{"step": 5}\n')
    store.write("eval/best-9-b/best.json", b'{"step": 9}\n')
    store.point("eval/best", "best-5-a")
    store.point("eval/best.json", "best/best.json")
    assert store.read("eval/best.json") == b'{"step": 5}\n'
    store.point("eval/best", "best-9-b")
    assert store.read("eval/best.json") == b'{"step": 9}\n' and store.pointer("eval/best") == "best-9-b"


def test_pin_of_an_object_deleted_during_the_download_is_gone(store: ObjectStorage,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    commit_model_5(store)
    real_get = store.fs.get_file

    def retention_first(rpath: str, lpath: str, **kwargs: object) -> None:
        if rpath.endswith(".index"):
            store.fs.rm_file(rpath)  # the trainer's retention, between the listing and the download
        real_get(rpath, lpath, **kwargs)

    monkeypatch.setattr(store.fs, "get_file", retention_first)
    with pytest.raises(Gone, match=r"model-5\.index was deleted while being read"), store.pin("model-5"):
        pass


def test_pin_of_an_object_replaced_during_the_download_is_gone(store: ObjectStorage,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    commit_model_5(store)
    real_get = store.fs.get_file

    def rewrite_after(rpath: str, lpath: str, **kwargs: object) -> None:
        real_get(rpath, lpath, **kwargs)
        if rpath.endswith(".index"):
            store.fs.pipe_file(rpath, b"another version")

    monkeypatch.setattr(store.fs, "get_file", rewrite_after)
    with pytest.raises(Gone, match=r"model-5\.index was replaced while being read"), store.pin("model-5"):
        pass


@pytest.fixture
def holder_elsewhere(store: ObjectStorage) -> Callable[[str, float], None]:
    """`write(key, expires_in)`: a lock or lease object of a process on another machine, as it would write it."""

    def write(key: str, expires_in: float) -> None:
        holder = Holder("other-host", 4242, "someone-else", time.time() + expires_in, "trainer on other-host pid 4242")
        store.write(key, holder.encode())

    return write


def test_a_lock_held_elsewhere_is_refused_until_it_expires(store: ObjectStorage,
                                                           holder_elsewhere: Callable[[str, float], None],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    holder_elsewhere("trainer.lock", 60)
    with pytest.raises(Locked, match="trainer on other-host pid 4242"), store.lock("trainer.lock", wait=False):
        pass
    holder_elsewhere("trainer.lock", -1)  # it stopped renewing a second ago
    with caplog.at_level(logging.WARNING, "ckpt_watch.bucket"), store.lock("trainer.lock", wait=False, note="ours"):
        held = Holder.parse(store.read("trainer.lock"))
        assert held is not None and held.note == "ours" and held.pid == os.getpid()
    assert "taking over" in caplog.text and "process 4242 on other-host (it ran out of time)" in caplog.text
    assert store.read("trainer.lock") is None  # released


def test_a_lock_is_renewed_while_held(bucket_workdir: str) -> None:
    store = ObjectStorage(bucket_workdir, lock_ttl=0.6)
    with store.lock("trainer.lock", wait=False, note="ours"):
        first = Holder.parse(store.read("trainer.lock"))
        time.sleep(1.0)
        later = Holder.parse(store.read("trainer.lock"))
        assert first is not None and later is not None and later.expires > first.expires
        assert later.owner == first.owner


def test_a_lock_is_exclusive_between_processes(store: ObjectStorage) -> None:
    code = ("import sys\nfrom common.storage.objectstore import ObjectStorage\n"
            "with ObjectStorage(sys.argv[1]).lock('trainer.lock', wait=False, note='held by the child'):\n"
            "    print('held', flush=True)\n    sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code, store.root], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    with child:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        with pytest.raises(Locked, match="held by the child"), store.lock("trainer.lock", wait=False):
            pass
        child.kill()
        child.wait()
    with store.lock("trainer.lock", wait=False, note="ours"):  # a dead pid on this host frees it at once
        pass


def test_leases_count_until_they_expire(store: ObjectStorage, holder_elsewhere: Callable[[str, float], None]) -> None:
    holder_elsewhere("eval/leases/model-5@4242-abc", 60)
    holder_elsewhere("eval/leases/model-7@4242-def", -1)
    with store.lease("model-9"):
        assert store.leased() == {"model-5", "model-9"}
    assert store.leased() == {"model-5"}
    assert store.clean_readers() == []
    assert store.names("eval/leases") == ["model-5@4242-abc"]  # the expired one was removed


def test_the_poller_fires_once_per_change(store: ObjectStorage) -> None:
    changes = []
    with store.watch({"checkpoint"}, lambda: changes.append(1), on_lost=lambda: None, poll=True, poll_secs=0.05):
        commit_files(store, "model-5", {".index": b"i", ".data-00000-of-00001": b"d"})
        deadline = time.monotonic() + 30
        while not changes and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # more polls, no more changes
    assert changes == [1]


def test_transient_errors_are_retried_and_logged(cloud: Servers, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name = cloud.new_bucket("s3")
    with FlakyProxy(cloud.s3, failures=2) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        url = BucketURL.parse(f"s3://{name}/run")
        store = ObjectStorage(url.url(), bucket=Bucket(url, filesystem(url)))
        with caplog.at_level(logging.WARNING, "ckpt_watch.bucket"):
            store.write("checkpoint", b"state")
        # Each 503 is retried once, by us (logged) or by the client library before us (not logged).
        assert store.bucket.retries >= 1 and caplog.text.count("retrying in") == store.bucket.retries
        assert store.read("checkpoint") == b"state"
        proxy.failures = proxy.seen + 100
        failing = ObjectStorage(url.url(), bucket=Bucket(url, filesystem(url), attempts=2))
        with pytest.raises(OSError, match="failed 2 times") as raised:
            failing.write("checkpoint", b"never")
        assert raised.value.errno == errno.EIO
    monkeypatch.undo()
    assert ObjectStorage(url.url()).read("checkpoint") == b"state"  # nothing was lost


COMMITTER = """
import hashlib, sys
from pathlib import Path
from typing import Any
from common.storage.objectstore import ObjectStorage
store, step = ObjectStorage(sys.argv[1]), int(sys.argv[2])
while True:
    step += 1
    name = f"model-{step}"
    target = store.checkpoint_target(name)
    Path(f"{target}.index").write_bytes(hashlib.sha256(name.encode()).digest() * 8)
    Path(f"{target}.data-00000-of-00001").write_bytes(hashlib.sha256(name.encode()).digest() * (4096 + step))
    store.commit_checkpoint(name, state_key="checkpoint", state=f'model_checkpoint_path: "{name}"\\n'.encode())
    for key in store.checkpoint_files(f"model-{step - 1}"):  # retention, after the commit point
        store.delete(key)
    print(step, flush=True)
"""


def byte_exact(store: Storage, name: str) -> int:
    """The step of COMMITTER's checkpoint `name`, after checking that its files are there, whole and byte-exact."""
    digest = hashlib.sha256(name.encode()).digest()
    step = int(name.rpartition("-")[2])
    assert store.read(f"{name}.index") == digest * 8
    assert store.read(f"{name}.data-00000-of-00001") == digest * (4096 + step)
    return step


@pytest.mark.parametrize("kills", [pytest.param(10, id="10-kills"),
                                   pytest.param(100, id="100-kills", marks=pytest.mark.soak)])
def test_kills_during_commits_always_leave_a_complete_checkpoint(store: ObjectStorage, kills: int) -> None:
    """SIGKILL a committing process at random instants: the state file names a byte-exact checkpoint each time."""
    rng = random.Random(kills)
    step = 0
    for _ in range(kills):
        child = subprocess.Popen([sys.executable, "-c", COMMITTER, store.root, str(step)], stdout=subprocess.PIPE,
                                 text=True)
        with child:
            assert child.stdout is not None and child.stdout.readline().strip()  # one commit at least
            time.sleep(rng.uniform(0, 0.3))
            child.kill()
        resumed = committed_step(store, check=byte_exact)
        assert resumed is not None and resumed > step  # each life committed something, and the relaunch resumes from it
        step = resumed


def test_a_limited_read_of_a_huge_object_fetches_only_a_range(store: ObjectStorage,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store.write("checkpoint", b"x" * (2 << 20))
    calls = []
    real_cat = store.fs.cat_file

    def counting(path: str, start: int | None = None, end: int | None = None, **kwargs: object) -> bytes:
        data = real_cat(path, start=start, end=end, **kwargs)
        calls.append(len(data))
        return data

    monkeypatch.setattr(store.fs, "cat_file", counting)
    assert store.read("checkpoint", limit=100) == b"x" * 100
    assert calls == [4096]  # one ranged GET, not 2 MiB


APPENDER = """
import sys
from common.run.protocol import FINGERPRINT, LedgerRow
from common.storage import open_storage
from common.run.ledger import Ledger
ledger, steps = Ledger(open_storage(sys.argv[1])), [int(s) for s in sys.argv[2].split(",")]
for s in steps:  # each evaluator records every checkpoint it evaluated; the ledger keeps one row of each
    ledger.append([LedgerRow({"checkpoint": f"model-{s}", "step": s, "split": "validation", "weights": "ema",
                              "status": "ok", "accuracy": s / 100, "committed": 1.0, FINGERPRINT: f"fp-{s}"})])
"""


def test_two_evaluators_append_to_one_ledger_without_duplicates_or_losses(store: ObjectStorage) -> None:
    """The evaluator's own Ledger in two processes on one bucket, both recording the same 8 checkpoints."""
    from common.run.ledger import Ledger

    steps = list(range(1, 9))
    orders = [",".join(map(str, steps)), ",".join(map(str, reversed(steps)))]
    children = [subprocess.Popen([sys.executable, "-c", APPENDER, store.root, order]) for order in orders]
    for child in children:
        assert child.wait(timeout=300) == 0
    rows = Ledger(store).read()
    assert sorted(r["step"] for r in rows) == steps


def test_adopting_a_pinned_checkpoint_copies_its_shards_server_side(store: ObjectStorage,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    shard = os.urandom(1 << 20)
    commit_files(store, "model-5", {".index": b"index-bytes", ".data-00000-of-00001": shard})
    uploaded: list[str] = []
    real_put = store.fs.put_file

    def counting(lpath: str, rpath: str, **kwargs: object) -> None:
        uploaded.append(rpath.rpartition("/")[2])
        real_put(lpath, rpath, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", counting)
    with store.pin("model-5") as private:
        (private.parent / "best.json").write_bytes(b'{"step": 5}\n')  # written locally, as evaluator/best.py does
        store.adopt(private.parent, "eval/best-5-abc")
    assert uploaded == ["best.json"]  # the index and the shard were copied inside the store
    assert store.names("eval/best-5-abc") == ["best.json", DATA, INDEX]
    assert store.read(f"eval/best-5-abc/{DATA}") == shard and store.read(f"eval/best-5-abc/{INDEX}") == b"index-bytes"


def test_a_tensorflow_checkpoint_committed_to_a_bucket_restores_from_its_pin(store: ObjectStorage,
                                                                             tmp_path: Path) -> None:
    """TF writes at `checkpoint_target`, the commit uploads it, a pin restores it: the layout of a local workdir."""
    import tensorflow as tf

    from common.checkpoint import checkpoints

    weights = tf.Variable([[1.5, -2.0], [0.25, 4.0]])
    tf.train.Checkpoint(w=weights).write(store.checkpoint_target("model-7"))
    state = checkpoints.State(latest="model-7", paths=["model-7"], timestamps=[1.0], last_preserved_timestamp=0.0)
    store.commit_checkpoint("model-7", state_key="checkpoint", state=checkpoints.state_bytes(state))
    assert checkpoints.read_state(store) == state
    assert store.checkpoint_files("model-7") == ["model-7.data-00000-of-00001", "model-7.index"]
    # The same three objects in a local folder are what TF itself reads as a workdir.
    for key in ("checkpoint", *store.checkpoint_files("model-7")):
        (tmp_path / key).write_bytes(store.read(key) or b"")
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model-7")
    restored = tf.Variable(tf.zeros([2, 2]))
    with store.pin("model-7") as private:
        tf.train.Checkpoint(w=restored).read(str(private)).assert_consumed()
    assert restored.numpy().tolist() == [[1.5, -2.0], [0.25, 4.0]]


def test_a_take_over_never_deletes_a_newer_holder(cloud: Servers) -> None:
    """The delete of an expired lock is conditional on the version that was judged expired.

    On S3 only: on GCS the delete carries `ifGenerationMatch`, which fake-gcs-server ignores on a
    DELETE (measured), so the emulator cannot show the refusal.
    """
    store = ObjectStorage(f"s3://{cloud.new_bucket('s3')}/run")
    stale = Holder("other-host", 4242, "first", time.time() - 1, "")
    store.write("trainer.lock", stale.encode())
    judged = store.bucket.head("trainer.lock")
    assert judged is not None
    store.write("trainer.lock", Holder("other-host", 4343, "second", time.time() + 60, "").encode())  # a faster taker
    assert not store.bucket.delete_if_unchanged("trainer.lock", judged)
    held = Holder.parse(store.read("trainer.lock"))
    assert held is not None and held.owner == "second"
    now = store.bucket.head("trainer.lock")
    assert now is not None and store.bucket.delete_if_unchanged("trainer.lock", now)
    assert store.read("trainer.lock") is None
