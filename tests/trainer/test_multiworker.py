"""`trainer --workers 2`: a real two-process MultiWorkerMirroredStrategy job on 127.0.0.1, against one process.

Each job costs two TensorFlow imports, so one finished job is shared by the module's tests; the
kill storm (tests/fault/test_kill_storm_multiworker.py) covers lost workers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from common.checkpoint import checkpoints
from common.storage import open_storage
from evaluator.config import EvalConfig
from evaluator.loop import run_once
from tests.fault.mw_storm import Job
from tests.helpers import Recorder, make_train_config
from tests.trainer.test_distribute import assert_same_weights
from trainer.lock import WorkdirLock
from trainer.loop import train
from trainer.warmstart import InitSpec

pytestmark = pytest.mark.slow  # each job starts two processes that import TensorFlow

SETTINGS = {"model": "mlp", "steps": 50, "save_every": 25, "keep": 0}


def job_flags(workdir: Path, data_dir: Path, **overrides: object) -> list[str]:
    flags = {"workdir": workdir, "data-dir": data_dir, "model": "mlp", "batch-size": 32, "steps": 50,
             "save-every": 25, "keep": 0, "steps-per-loop": 10, "progress": "plain", "log-every": 25} | overrides
    return [text for name, value in flags.items() for text in (f"--{name}", str(value))]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> tuple[Path, Job, Path]:
    """A finished 2-worker job of 50 mlp steps; its workers' TMPDIR is a folder of its own."""
    root = tmp_path_factory.mktemp("two-workers")
    scratch = root / "tmp"
    scratch.mkdir()
    job = Job(job_flags(root / "run", tiny_data), env=os.environ | {"TMPDIR": str(scratch)})
    assert job.finish() == 0, job.err[-5:]
    return root / "run", job, scratch


def test_two_workers_reach_the_weights_of_one_process(two_workers: tuple[Path, Job, Path], tiny_data: Path,
                                                      tmp_path: Path) -> None:
    workdir, job, scratch = two_workers
    for i in (0, 1):
        assert any(re.fullmatch(rf"\[worker {i}\] strategy multi-worker: 2 workers, 2 replicas, chief worker 0 "
                                rf"\(127\.0\.0\.1:\d+\) \(this is worker {i}\)", line) for line in job.out), job.out
    assert any(line.startswith("[worker 0] ") and " trainer final step=50 " in line for line in job.out)
    # Collective saves stay sync, and the chief says so; its save lines say sync.
    assert any(line.startswith("[worker 0] saves are sync: a multi-worker save is collective") for line in job.out)
    assert any(line.startswith("[worker 0] ") and " trainer saved step=50 mode=sync " in line for line in job.out)
    # Sync like the job's saves: an async save writes the same tensors in one data shard, not two.
    one = make_train_config(tiny_data, tmp_path / "one", save_mode="sync", **SETTINGS)
    train(one, reporter=Recorder())
    for step in (25, 50):
        assert_same_weights(one.workdir / f"model-{step}", workdir / f"model-{step}")
    run = json.loads((workdir / "run.json").read_text())
    assert (run["strategy"], run["replicas"], run["workers"]) == ("multi-worker", 2, 2)
    # Only the chief wrote the workdir, and worker 1's scratch folders are gone.
    names = {p.name for p in workdir.iterdir()}
    assert names - {p.name for p in one.workdir.iterdir()} == set()
    assert list(scratch.iterdir()) == []


def test_evaluator_and_warm_start_read_a_multi_worker_workdir(two_workers: tuple[Path, Job, Path],
                                                              tiny_data: Path, tmp_path: Path) -> None:
    workdir = Path(shutil.copytree(two_workers[0], tmp_path / "copy"))
    run_once(EvalConfig(workdir=workdir, data_dir=str(tiny_data)))
    rows = [json.loads(line) for line in (workdir / "eval" / "results.jsonl").read_text().splitlines()]
    assert {r["checkpoint"] for r in rows} == {"model-25", "model-50"}
    assert {r["status"] for r in rows} == {"ok"}
    rec = Recorder()
    warm = make_train_config(tiny_data, tmp_path / "warm", **(SETTINGS | {"steps": 1, "save_every": 1}),
                             init=InitSpec(str(workdir)))
    train(warm, reporter=rec)
    assert any("model/fc1/kernel" in m for m in rec.messages), rec.messages  # the warm start's table


def test_resume_from_two_workers_on_one_and_back_then_sigterm_commits_once(
        two_workers: tuple[Path, Job, Path], tiny_data: Path, tmp_path: Path) -> None:
    workdir = Path(shutil.copytree(two_workers[0], tmp_path / "copy"))
    rec = Recorder()
    result = train(make_train_config(tiny_data, workdir, **(SETTINGS | {"steps": 75})), reporter=rec)
    assert rec.messages[0] == "resumed from model-50 (step 50)" and result.final_step == 75
    assert any(m.startswith("run.json records 2 replica(s) (multi-worker, 2 worker(s))") for m in rec.messages)
    job = Job(job_flags(workdir, tiny_data, steps=10**8, **{"save-every": 10**6, "log-every": 5}))
    assert job.wait_for("[worker 0] resumed from") == "[worker 0] resumed from model-75 (step 75)"
    assert job.wait_for("[worker 0] ", " trainer progress step=") is not None  # training has begun
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish() == 0, job.err[-5:]
    stopped = [line for line in job.out if " stopped by SIGTERM at step " in line]
    assert len(stopped) == 2 and stopped[0].split("] ", 1)[1] == stopped[1].split("] ", 1)[1], stopped
    step = int(re.search(r"at step (\d+); saved model-(\1)$", stopped[0])[1])  # type: ignore[index]
    assert step > 75
    state = checkpoints.read_state(open_storage(workdir))
    assert state is not None and state.latest == f"model-{step}"
    assert checkpoints.on_disk(open_storage(workdir)) == [25, 50, 75, step]  # the stop committed exactly one checkpoint


def test_a_second_job_on_a_locked_workdir_is_refused_by_its_chief(two_workers: tuple[Path, Job, Path],
                                                                 tiny_data: Path, tmp_path: Path) -> None:
    workdir = Path(shutil.copytree(two_workers[0], tmp_path / "copy"))
    with WorkdirLock(open_storage(workdir)):  # another trainer holds the workdir
        before = {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()}
        job = Job(job_flags(workdir, tiny_data, steps=100))
        assert job.finish() == 2
    assert any(line.startswith("[worker 0] trainer: error: ") and "another trainer is running on this workdir"
               in line for line in job.err), job.err
    assert job.err[-1] == "trainer: error: worker 0 failed (exit code 2); ended the other workers"
    assert {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()} == before
