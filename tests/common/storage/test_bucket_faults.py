"""A bucket workdir through an unreliable network: a proxy on 127.0.0.1 that resets, throttles, delays and cuts.

`tests/cloud.py`'s `FlakyProxy` stands between the client and each store (moto's S3 server,
fake-gcs-server) and injects its faults at a set rate, seeded, counting each. The storage's own
code runs unchanged: what is checked is that every fault was retried (and logged) and that what
was written reads back byte for byte.
"""

from __future__ import annotations

import logging
import os
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
