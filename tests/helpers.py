"""Tiny generated MNIST-like data and config builders shared by the tests."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.data.idx import write_idx
from common.signals import StopRequest
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
    base = {"workdir": workdir, "steps": 60, "save_every": 20, "keep": 5, "data_dir": str(tiny_data),
            "steps_per_loop": 10, "log_every": 20, "progress": "plain"}
    return TrainConfig(spec=spec, **(base | overrides))


def watch_beside_trainer(trainer_args: list[str], cfg: Any, display: Any, *,
                         timeout: float = 180) -> tuple[Any, str, str, int]:
    """Run a real trainer process while the real watch loop runs here; return (stop, out, err, returncode).

    A timer stops the watch loop after `timeout` seconds, so a hang fails the test instead of CI.
    """
    import subprocess
    import sys
    import threading

    from common.signals import StopRequest
    from evaluator.loop import run_watch

    trainer = subprocess.Popen([sys.executable, "-m", "trainer.cli", *trainer_args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    stop = StopRequest()
    guard = threading.Timer(timeout, stop.set, args=("timeout",))
    guard.daemon = True
    guard.start()
    try:
        run_watch(cfg, display, stop)
    finally:
        guard.cancel()
        out, err = trainer.communicate(timeout=120)
    return stop, out, err, trainer.returncode


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
        self.rows, _ = rows, self.statuses.append(status)
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


def mnist_model(name: str, *, seed: int = 0) -> Any:
    """Model `name` built for the MNIST family's images and 10 classes."""
    from common.data import datasets
    from common.model import registry

    return registry.build(name, num_classes=10, input_shape=datasets.MNIST_INPUT.shape, seed=seed)


def two_evaluators_at_once(workdir: str, data_dir: Path) -> None:
    """Run two `evaluator --once --weights both` processes on `workdir` at the same time; both must exit 0."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "evaluator.cli", "--workdir", workdir, "--data-dir", str(data_dir),
           "--once", "--weights", "both"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err


def committed_step(storage: Any, workdir: str) -> int | None:
    """The step of the checkpoint the state file names (in a bucket too), after checking that it reads in full."""
    from common.checkpoint import checkpoints

    state = checkpoints.read_state(storage)
    if state is None or state.latest is None:
        return None
    prefix = checkpoints.resolve(workdir, state.latest)
    why = checkpoints.check_readable(prefix)
    assert why is None, f"the state file names {state.latest}, which is not readable: {why}"
    with checkpoints.local_copy(prefix) as local:
        return checkpoints.read_step(local)
