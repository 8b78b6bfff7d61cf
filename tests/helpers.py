"""Tiny generated MNIST-like data and config builders shared by the tests."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.data.idx import write_idx
from common.signals import StopRequest
from common.storage import Storage
from trainer.progress import PlainLog

REPO = Path(__file__).resolve().parents[1]  # the project's root: where the programs run from in tests


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images whose class is a bright bar at a class-dependent row: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (rng.random((n, 28, 28)) * 120).astype(np.uint8)
    for i, label in enumerate(labels):
        row = 2 + 2 * int(label) + int(rng.integers(-1, 2))
        images[i, row:row + 3, 4:24] = 255
    return images, labels


def write_dataset(folder: Path, *, n_train: int = 600, n_test: int = 200, gz: bool = True, dotted: bool = False,
                  seed: int = 0) -> Path:
    """Write the four IDX files of a tiny dataset into `folder` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    sep = "." if dotted else "-"
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = make_images(n, s)
        write_idx(folder / f"{prefix}-images{sep}idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels{sep}idx1-ubyte{suffix}", labels)
    return folder


def make_train_config(tiny_data: Path, workdir: Path, **overrides: Any) -> Any:
    """A TrainConfig for a tiny, fast softmax run; keyword arguments override any field."""
    from common.data.datasets import DATASETS
    from common.run.spec import RunSpec
    from trainer.cli import RUN_DEFAULTS
    from trainer.config import TrainConfig

    spec_fields = {k: overrides.pop(k) for k in list(overrides) if k in RUN_DEFAULTS}
    settings = RUN_DEFAULTS | {"model": "softmax", "batch_size": 32} | spec_fields
    names = DATASETS[settings["dataset"]].class_names
    subset = tuple(names[i] for i in settings["classes"])
    spec = RunSpec(**settings, class_names=subset or names)
    base: dict[str, Any] = {"workdir": workdir, "steps": 60, "save_every": 20, "keep": 5, "data_dir": str(tiny_data),
            "steps_per_loop": 10, "log_every": 20, "progress": "plain"}
    return TrainConfig(spec=spec, **(base | overrides))


def watch_beside(module: str, args: list[str], cfg: Any, display: Any, *, stop: StopRequest | None = None,
                 timeout: float = 180) -> tuple[StopRequest, str, str, int]:
    """Run `python -m module args` while the real watch loop runs here; return (stop, out, err, returncode).

    A timer stops the watch loop after `timeout` seconds (reason "timeout"), so a hang fails the test
    instead of CI. `stop` is the loop's stop request (a display may set it); a new one by default.
    """
    import subprocess
    import sys
    import threading

    from evaluator.loop import run_watch

    process = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
    stop = StopRequest() if stop is None else stop
    guard = threading.Timer(timeout, stop.set, args=("timeout",))
    guard.daemon = True
    guard.start()
    try:
        run_watch(cfg, display, stop)
    finally:
        guard.cancel()
        out, err = process.communicate(timeout=120)
    return stop, out, err, process.returncode


@dataclasses.dataclass(frozen=True)
class Watched:
    """A reference training loop's run (not this project's trainer), watched by the evaluator to its end."""

    workdir: Path
    data: Path  # the tiny MNIST-like dataset it trained on
    refs: dict[str, dict[str, Any]]  # checkpoint -> the loop's own evaluation: {"ema": accuracy, "raw": ..., ...}
    validation: Any  # that dataset's validation split (common.data.datasets.Split)


def watch_reference_loop(root: Path, module: str, args: list[str], *, last: str, **options: Any) -> Watched:
    """Run reference loop `python -m module args` while the watch loop (--weights both) evaluates it here.

    Its data is written first: the IDX files in `root/data`, the validation and training splits as
    `root/validation.npz` and `root/train.npz`. The loop (whose `args` name those paths) trains into
    `root/run` and writes its own evaluation of each checkpoint to `root/refs.jsonl`. The watch loop
    stops once checkpoint `last` is evaluated, and fails after 150 s; `options` go to EvalConfig.
    """
    from common.data import datasets
    from evaluator.config import EvalConfig

    data = write_dataset(root / "data", n_train=1200, n_test=200)
    loaded = datasets.load("mnist", str(data))
    np.savez(root / "validation.npz", images=loaded.validation.images, labels=loaded.validation.labels)
    np.savez(root / "train.npz", images=loaded.train.images, labels=loaded.train.labels)
    stop = StopRequest()
    spy = Spy(stop, until=lambda status: any(r.checkpoint == last and r.status == "ok" for r in spy.rows))
    cfg = EvalConfig(workdir=root / "run", data_dir=str(data), weights="both", **options)
    stop, _, err, code = watch_beside(module, args, cfg, spy, stop=stop, timeout=150)
    assert code == 0, err[-2000:]
    assert stop.reason == "test", "the watch loop never evaluated the last checkpoint"
    rows = [json.loads(line) for line in (root / "refs.jsonl").read_text().splitlines()]
    return Watched(root / "run", data, {r["checkpoint"]: r for r in rows}, loaded.validation)


class Recorder(PlainLog):
    """A plain reporter that also keeps every message."""

    def __init__(self) -> None:
        super().__init__(every=1000, stream=io.StringIO())
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)


class Spy:
    """A display that keeps what it was shown and can stop the loop on a condition."""

    def __init__(self, stop: StopRequest | None = None, until: Callable[[dict[str, Any]], bool] | None = None):
        self.statuses: list[dict[str, Any]] = []
        self.rows: list[Any] = []
        self.stop, self.until = stop, until

    def update(self, rows: list[Any], status: dict[str, Any]) -> None:
        self.rows = rows
        self.statuses.append(status)
        if self.stop is not None and self.until is not None and self.until(status):
            self.stop.set("test")

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def listing(workdir: Path) -> dict[str, float]:
    """Every entry of `workdir` with its modification time: to show that nothing changed."""
    return {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()}


def run_trainer_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `trainer` in this process; return its exit code, stdout and stderr."""
    from trainer import cli

    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def run_evaluator_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `evaluator` in this process; return its exit code, stdout and stderr."""
    from evaluator import cli

    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@functools.cache
def mirrored() -> Any:
    """A MirroredStrategy over the tests' two logical CPUs (conftest), one for the whole session: two
    strategies over the same devices in one process share collective keys, and the second then fails
    with a shape mismatch in a collective instance."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def mnist_model(name: str, *, seed: int = 0) -> Any:
    """Model `name` built for the MNIST family's images and 10 classes."""
    from common.data import datasets
    from common.model import registry

    return registry.build(name, num_classes=10, input_shape=datasets.MNIST_INPUT.shape, seed=seed)


def commit_files(storage: Storage, name: str, files: dict[str, bytes], state: bytes | None = None) -> None:
    """Commit checkpoint `name` as the trainer does: `files` (suffix -> bytes) written, then `commit_checkpoint`.

    The files go where `checkpoint_target` says; `state` is the new state file (by default one naming `name`).
    """
    target = storage.checkpoint_target(name)
    for suffix, data in files.items():
        Path(f"{target}{suffix}").write_bytes(data)
    state = f'model_checkpoint_path: "{name}"\n'.encode() if state is None else state
    storage.commit_checkpoint(name, state_key="checkpoint", state=state)


def commit_model_5(storage: Storage) -> None:
    """Commit a small checkpoint `model-5` of two files (not TensorFlow's) through `storage`."""
    commit_files(storage, "model-5", {".index": b"index-bytes", ".data-00000-of-00001": b"data" * 1000})


def committed_step(storage: Storage, *, check: Callable[[Storage, str], int] | None = None) -> int | None:
    """The step of the checkpoint the state file names (None before the first commit), once it reads in full.

    By default TensorFlow reads every tensor of it (a pinned download in a bucket) and the step is its
    `global_step`; `check(storage, name)` does both for checkpoints that are not TensorFlow's.
    """
    from common.checkpoint import checkpoints

    state = checkpoints.read_state(storage)
    if state is None or state.latest is None:
        return None
    if check is not None:
        return check(storage, state.latest)
    name = storage.key_of(state.latest)
    assert name is not None, f"the state file names {state.latest}, outside the workdir"
    why = checkpoints.check_readable(storage, name)
    assert why is None, f"the state file names {state.latest}, which is not readable: {why}"
    with storage.readable(name) as local:
        return checkpoints.read_step(local)


def contents(root: Path) -> dict[str, bytes | str]:
    """Every entry below `root` with its bytes (a link: its target; a folder: "/"): to show that nothing changed."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        found[key] = f"-> {os.readlink(path)}" if path.is_symlink() else "/" if path.is_dir() else path.read_bytes()
    return found


def checkpoint_files(prefix: Path) -> list[Path]:
    """The files of the local checkpoint `prefix`: its `.index`, `.data-*` shards and a Saver's `.meta`."""
    from common.storage import open_storage

    return [prefix.parent / key for key in open_storage(prefix.parent).checkpoint_files(prefix.name)]
