"""A bucket workdir through an unreliable network: a proxy on 127.0.0.1 that resets, throttles, delays and cuts.

`tests/cloud.py`'s `FlakyProxy` stands between the client and each store (moto's S3 server,
fake-gcs-server) and injects its faults at a set rate, seeded, counting each. The storage's own
code runs unchanged: what is checked is that every fault was retried (and logged) and that what
was written reads back byte for byte.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from common.storage import bucket as bucket_lib
from common.storage.bucket import Bucket, BucketURL, filesystem
from common.storage.objectstore import ObjectStorage
from tests.cloud import FlakyProxy, Servers
from tests.helpers import commit_files

pytestmark = pytest.mark.cloud
ENDPOINT = {"s3": "AWS_ENDPOINT_URL", "gs": "STORAGE_EMULATOR_HOST"}


def _through(proxy: FlakyProxy, scheme: str, name: str, monkeypatch: pytest.MonkeyPatch, *,
             timeout: float = bucket_lib.REQUEST_TIMEOUT_SECS) -> ObjectStorage:
    """A workdir in bucket `name` whose requests go through `proxy` (short backoffs: the test waits less)."""
    monkeypatch.setenv(ENDPOINT[scheme], proxy.url)
    url = BucketURL.parse(f"{scheme}://{name}/run")
    return ObjectStorage(url.url(), bucket=Bucket(url, filesystem(url, timeout=timeout), backoff_secs=0.01))


# gcsfs waits 1 to 2 s before its first retry (it cannot be told otherwise): fewer faults on GCS keep the test short.
@pytest.mark.parametrize(("scheme", "rate"), [("s3", 0.25), ("gs", 0.1)])
def test_a_round_trip_through_faults_retries_them_and_loses_nothing(
        scheme: str, rate: float, cloud: Servers, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    upstream = cloud.s3 if scheme == "s3" else cloud.gcs
    files = {".index": os.urandom(3000), ".data-00000-of-00001": os.urandom(600_000)}
    gcsfs_before = bucket_lib._GcsfsRetries.seen
    with FlakyProxy(upstream, rate=rate, seed=7, delay_secs=0.05) as proxy, caplog.at_level(logging.WARNING):
        store = _through(proxy, scheme, cloud.new_bucket(scheme), monkeypatch)
        for step in (5, 10):
            commit_files(store, f"model-{step}", files)
        store.append("eval/results.jsonl", b'{"a": 1}\n')
        with store.pin("model-10") as pinned:
            copies = {suffix: Path(f"{pinned}{suffix}").read_bytes() for suffix in files}
        assert store.read("eval/results.jsonl") == b'{"a": 1}\n'
        assert store.read("checkpoint") == b'model_checkpoint_path: "model-10"\n'
        injected = dict(proxy.injected)
    assert copies == files  # byte for byte, through cut and reset answers
    failed = sum(injected.values()) - injected.get("delay", 0)  # tries that got no answer, or a broken one
    assert failed >= 3, injected
    # Each was retried: by us or by gcsfs (both logged, one line each), or, unlogged, by aiohttp (a reset
    # of a reused connection is retried once at once) or by s3fs (`info` falls back to a listing).
    retried = store.bucket.retries + bucket_lib._GcsfsRetries.seen - gcsfs_before
    assert 1 <= retried <= failed, (retried, injected)
    assert caplog.text.count("retrying") == retried
    assert "Traceback" not in caplog.text


def test_a_request_that_hangs_is_cut_by_the_timeout_and_retried(
        cloud: Servers, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    name = cloud.new_bucket("s3")
    ObjectStorage(f"s3://{name}/run").write("checkpoint", b"state")
    # The first request hangs for a minute; the client's 0.5 s timeout cuts it, and the retry is answered.
    with (FlakyProxy(cloud.s3, rate=1.0, faults=("hang",), hang_secs=60, limit=1) as proxy,
          caplog.at_level(logging.WARNING)):
        store = _through(proxy, "s3", name, monkeypatch, timeout=0.5)
        assert store.read("checkpoint") == b"state"
    assert proxy.injected == {"hang": 1} and store.bucket.retries == 1
    assert "retrying in" in caplog.text


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_pin_downloads_again_a_copy_cut_short_and_never_keeps_half(
        scheme: str, cloud: Servers, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    name = cloud.new_bucket(scheme)
    files = {".index": os.urandom(2000), ".data-00000-of-00002": os.urandom(300_000),
             ".data-00001-of-00002": os.urandom(300_000)}
    commit_files(ObjectStorage(f"{scheme}://{name}/run"), "model-5", files)
    # One object's answer is cut in half under a Content-Length that says so: the client sees a complete answer.
    upstream = cloud.s3 if scheme == "s3" else cloud.gcs
    with FlakyProxy(upstream, rate=1.0, faults=("short",), limit=1) as proxy, caplog.at_level(logging.WARNING):
        store = _through(proxy, scheme, name, monkeypatch)
        with store.pin("model-5") as pinned:
            copies = {suffix: Path(f"{pinned}{suffix}").read_bytes() for suffix in files}
    assert proxy.injected == {"short": 1} and copies == files
    # Caught by our check of the copy, or before it by the S3 client's own (botocore checks the CRC32
    # that moto sends with a whole object): either way one download again, logged.
    assert caplog.text.count("does not verify") + caplog.text.count("did not match calculated checksum") == 1
    assert store.bucket.retries == 1
    # Every answer cut: the pin fails in one line after its attempts, and leaves no folder behind.
    with FlakyProxy(upstream, rate=1.0, faults=("short",)) as proxy:
        store = _through(proxy, scheme, name, monkeypatch)
        with (pytest.raises(OSError, match=r"did not verify 3 times: the store holds|failed 8 times") as raised,
              store.pin("model-5")):
            pass
    assert raised.value.errno == errno.EIO and not store._pinned


def test_a_multipart_upload_verifies_by_its_etag_and_a_changed_one_does_not(
        cloud: Servers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bucket_lib, "PART_BYTES", 5 << 20)  # S3's smallest part: an 11 MiB file goes in 3 parts
    store = ObjectStorage(f"s3://{cloud.new_bucket('s3')}/run")
    local = tmp_path / "big"
    local.write_bytes(os.urandom(11 << 20))
    store.bucket.upload("big", local)  # verified: by the multipart ETag, which is no MD5 of the object
    info = store.fs.info(store.url.path("big"))
    assert str(info["ETag"]).strip('"').endswith("-3")
    digest = bucket_lib.Digest.of(local)
    assert bucket_lib.mismatch(info, digest) is None
    changed = bytearray(local.read_bytes())
    changed[7 << 20] ^= 1  # one bit of the second part
    local.write_bytes(bytes(changed))
    assert bucket_lib.mismatch(info, bucket_lib.Digest.of(local)) == "the multipart ETag differs"


def test_staging_folders_of_dead_processes_go_without_a_word(cloud: Servers) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = Path(tempfile.gettempdir()) / f"ckpt-watch-stage-{dead.stdout.strip()}-x1"
    folder.mkdir()
    (folder / "model-5.index").write_bytes(b"staged")
    assert ObjectStorage(f"s3://{cloud.new_bucket('s3')}/run").clean_leftovers() == []  # nothing to tell the user
    assert not folder.exists()
