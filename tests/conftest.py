from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common.tfenv import Runtime, configure, quiet_import_tensorflow

quiet_import_tensorflow()
# As the programs do, before the first op: memory growth on any GPU, so that the in-process `cli.main`
# calls of the tests find the settings they would apply already in place.
configure(Runtime())

from tests.helpers import make_train_config, write_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the four IDX files of a 600 + 200 image dataset."""
    return write_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def make_config(tiny_data: Path, tmp_path: Path) -> Callable[..., Any]:
    """Build a TrainConfig for a tiny, fast run in a temp workdir; keyword arguments override."""
    return lambda **overrides: make_train_config(tiny_data, tmp_path / "run", **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A finished tiny run with checkpoints model-20, model-40, model-60 (all kept)."""
    from tests.test_trainer import Recorder
    from trainer.loop import train

    cfg = make_train_config(tiny_data, tmp_path_factory.mktemp("trained") / "run", steps=60, save_every=20, keep=0)
    train(cfg, reporter=Recorder())
    return cfg.workdir


@pytest.fixture
def workdir(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained workdir."""
    return Path(shutil.copytree(trained, tmp_path / "copy"))


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a non-daemon thread running (watchdog observers, workers)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    assert not leaked, f"threads leaked: {leaked}"
