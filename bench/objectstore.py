"""Bucket workdirs on the S3 emulator (moto, on 127.0.0.1): detection latency, requests per idle poll, save cost.

    python -m bench.objectstore [--samples 10] [--poll-secs 2] [--shard-mib 4]

Rows (printed as JSON, one object; `make bench` shows them as B11-B13):
  - detection_latency_s: from the state file's PUT (the commit point) to the start of the pinned
    download that restores it, through the evaluator's watch (a poller of metadata); p50 and all samples;
  - requests_per_idle_poll: HTTP requests per poll of an idle workdir holding 5 and 100 checkpoints,
    counted by a pass-through proxy in front of the server;
  - save_s: one checkpoint commit (an index and one data shard of --shard-mib), local vs the emulator.
Needs the `cloud` extra. Figures of an emulator on the same machine: no network, only the protocol's cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common.checkpoint.checkpoints import STATE_FILE
from common.storage import Storage
from common.storage.bucket import Bucket, BucketURL, filesystem
from common.storage.local import LocalStorage
from common.storage.objectstore import ObjectStorage
from tests.cloud import FlakyProxy, Servers, cloud_servers


def commit(storage: Storage, step: int, shard: bytes) -> float:
    """Write and commit checkpoint model-<step>; return the seconds the commit took (TF's write excluded)."""
    target = storage.checkpoint_target(f"model-{step}")
    Path(f"{target}.index").write_bytes(os.urandom(2048))
    Path(f"{target}.data-00000-of-00001").write_bytes(shard)
    start = time.perf_counter()
    storage.commit_checkpoint(f"model-{step}", state_key="checkpoint",
                              state=f'model_checkpoint_path: "model-{step}"\n'.encode())
    return time.perf_counter() - start


def detection_latency(store: ObjectStorage, samples: int, poll_secs: float) -> list[float]:
    """Seconds from each commit's state-file PUT to the start of its pinned download, via `watch`."""
    woke = threading.Event()
    latencies = []
    with store.watch({STATE_FILE}, woke.set, on_lost=woke.set, poll=True, poll_secs=poll_secs):
        for step in range(1, samples + 1):
            woke.clear()
            commit(store, step, b"x" * 1024)
            committed = time.perf_counter()
            if not woke.wait(poll_secs * 10):
                raise RuntimeError(f"no notice of model-{step} in {poll_secs * 10:.0f} s")
            with store.pin(f"model-{step}"):
                pass
            latencies.append(time.perf_counter() - committed)
            time.sleep(poll_secs * (step % 3) / 3)  # commits at different phases of the poll
    return latencies


def requests_per_poll(servers: Servers, checkpoints: int, polls: int = 10) -> float:
    """HTTP requests per poll of an idle workdir with `checkpoints` checkpoints (counted by a proxy)."""
    url = BucketURL.parse(f"s3://{servers.new_bucket('s3')}/run")
    store = ObjectStorage(url.url())
    for step in range(1, checkpoints + 1):
        commit(store, step, b"x" * 64)
    with FlakyProxy(servers.s3, failures=0) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        try:
            counted = ObjectStorage(url.url(), bucket=Bucket(url, filesystem(url)))
            watcher = counted.watch({STATE_FILE}, lambda: None, on_lost=lambda: None, poll=True, poll_secs=0.05)
            with watcher:
                start = proxy.seen
                while watcher.polls < polls:
                    time.sleep(0.01)
                seen, done = proxy.seen - start, watcher.polls
        finally:
            os.environ["AWS_ENDPOINT_URL"] = servers.s3
    return seen / done


def save_cost(servers: Servers, samples: int, shard_mib: float) -> dict[str, Any]:
    """Median seconds of one commit on a local folder and on the emulator."""
    shard = os.urandom(int(shard_mib * (1 << 20)))
    with tempfile.TemporaryDirectory() as folder:
        local = [commit(LocalStorage(folder), step, shard) for step in range(1, samples + 1)]
    store = ObjectStorage(f"s3://{servers.new_bucket('s3')}/run")
    bucket = [commit(store, step, shard) for step in range(1, samples + 1)]
    return {"shard_mib": shard_mib, "local_p50": statistics.median(local), "s3_emulator_p50": statistics.median(bucket),
            "local": local, "s3_emulator": bucket}


def measure(*, samples: int, poll_secs: float, shard_mib: float) -> dict[str, Any]:
    """The three rows, on servers started for the measurement."""
    with cloud_servers() as servers:
        store = ObjectStorage(f"s3://{servers.new_bucket('s3')}/run")
        latencies = detection_latency(store, samples, poll_secs)
        return {
            "detection_latency_s": {"poll_secs": poll_secs, "p50": statistics.median(latencies), "samples": latencies},
            "requests_per_idle_poll": {str(n): requests_per_poll(servers, n) for n in (5, 100)},
            "save_s": save_cost(servers, samples, shard_mib),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--poll-secs", type=float, default=2.0)
    parser.add_argument("--shard-mib", type=float, default=4.0)
    args = parser.parse_args(argv)
    json.dump(measure(samples=args.samples, poll_secs=args.poll_secs, shard_mib=args.shard_mib), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
