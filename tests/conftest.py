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
# calls of the tests find the settings they would apply already in place. Two logical CPU devices let
# tests run `MirroredStrategy` in this process (`--strategy mirrored --devices 2`); the default
# strategy uses the first.
configure(Runtime(cpu_devices=2))

from tests.cloud import MISSING, SKIP_REASON, Servers, cloud_servers  # noqa: E402
from tests.helpers import make_train_config, write_dataset  # noqa: E402

# The longest files, longest first (seconds on a 2-core machine): `make test` hands whole files to
# two workers in this order (pytest-xdist's loadfile, --no-loadscope-reorder), so that none of them
# starts last and runs alone at the end. Every other file keeps its place after them.
LONGEST_FIRST = (
    "tests/fault/test_kill_storm.py",  # 5 kills
    "tests/fault/test_kill_storm_bucket.py",  # 1 kill on each store, then a last start
    "tests/fault/test_kill_storm_multiworker.py",
    "tests/e2e/test_bucket_workdir.py",
    "tests/evaluator/test_several_evaluators.py",
    "tests/trainer/test_warmstart.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))  # stable: the rest in order


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the four IDX files of a 600 + 200 image dataset."""
    return write_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def make_config(tiny_data: Path, tmp_path: Path) -> Callable[..., Any]:
    """Build a TrainConfig for a tiny, fast run in a temp workdir; keyword arguments override."""
    return lambda **overrides: make_train_config(tiny_data, tmp_path / "run", **overrides)


# The one family of trained-workdir fixtures: `trained_runs` trains each kind of tiny run once per
# session; `trained` is the default kind (a module may override it to pick another); tests that
# change files get a private copy through `workdir` or `trained_config`.
TRAINED_SETTINGS = {"steps": 60, "save_every": 20, "keep": 0}  # checkpoints model-20, -40, -60, all kept


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Callable[..., Path]:
    """`trained_runs(model="softmax", evaluated=False)`: a finished tiny run (read-only: copy it to change it)."""
    cache: dict[tuple[str, bool], Path] = {}

    def get(model: str = "softmax", evaluated: bool = False) -> Path:
        if (model, evaluated) not in cache:
            if evaluated:
                from evaluator.config import EvalConfig
                from evaluator.loop import run_once

                folder = Path(shutil.copytree(get(model), tmp_path_factory.mktemp(f"{model}-evaluated") / "run"))
                run_once(EvalConfig(workdir=folder, data_dir=str(tiny_data)))
            else:
                from tests.helpers import Recorder
                from trainer.loop import train

                cfg = make_train_config(tiny_data, tmp_path_factory.mktemp(model) / "run", model=model,
                                        **TRAINED_SETTINGS)
                train(cfg, reporter=Recorder())
                folder = cfg.workdir
            cache[model, evaluated] = folder
        return cache[model, evaluated]

    return get


@pytest.fixture
def trained(trained_runs: Callable[..., Path]) -> Path:
    """The default finished tiny run: softmax, not evaluated."""
    return trained_runs()


@pytest.fixture
def workdir(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained workdir (links kept as links)."""
    return Path(shutil.copytree(trained, tmp_path / "copy", symlinks=True))


@pytest.fixture
def trained_config(trained_runs: Callable[..., Path], make_config: Callable[..., Any]) -> Any:
    """The default trained run copied into this test's workdir, with the TrainConfig that resumes it."""
    cfg = make_config(**TRAINED_SETTINGS)
    shutil.copytree(trained_runs(), cfg.workdir, symlinks=True)
    return cfg


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a non-daemon thread running (watchdog observers, workers)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    assert not leaked, f"threads leaked: {leaked}"


@pytest.fixture(scope="session")
def cloud() -> Iterator[Servers]:
    """An S3 server and a GCS emulator on 127.0.0.1 for the whole session (skipped where the extra is missing)."""
    if MISSING:
        pytest.skip(SKIP_REASON)
    with cloud_servers() as servers:
        yield servers


@pytest.fixture(params=["s3", "gs"])
def bucket_workdir(request: pytest.FixtureRequest, cloud: Servers) -> str:
    """`s3://<new bucket>/run` and `gs://<new bucket>/run`: an empty workdir in a fresh bucket of each store."""
    return f"{request.param}://{cloud.new_bucket(request.param)}/run"
