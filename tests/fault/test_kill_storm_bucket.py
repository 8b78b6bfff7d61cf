"""Kill storms of a trainer on a bucket workdir (`s3://`, `gs://`; servers on 127.0.0.1), an evaluator watching.

After each SIGKILL the state file must name a checkpoint that reads in full, and the relaunch must
resume from exactly that one; a last start with fewer steps leaves exactly the listed checkpoints.
The commit itself is stormed on both stores in tests/common/storage/test_objectstore.py.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.checkpoint import checkpoints
from common.run.ledger import Ledger
from common.storage import Stat, Storage, open_storage
from common.storage.paths import BucketPath
from tests.helpers import REPO, committed_step

pytestmark = pytest.mark.cloud


def _launch_trainer(workdir: str, data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """Start a trainer that saves every 10 steps for ever; return it and its first line (how it started)."""
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "--workdir", workdir, "--data-dir", str(data_dir),
                             "--model", "mlp", "--steps", "100000000", "--save-every", "10", "--steps-per-loop", "5",
                             "--keep", "3", "--progress", "plain", "--log-every", "100000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()  # printed once the restore is done, before the first step
    return proc, first


def _await_commit(storage: Storage, before: Stat | None, proc: subprocess.Popen[str]) -> None:
    """Wait until the trainer commits a checkpoint (the state file changes), for at most a minute."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        now = storage.stat(checkpoints.STATE_FILE)
        if now is not None and (before is None or now.token != before.token):
            return
        time.sleep(0.1)
    raise AssertionError(f"the trainer committed nothing within a minute (exit {proc.poll()})")


def kill_storm(workdir: str, data_dir: Path, *, kills: int, seed: int = 0) -> list[int]:
    """SIGKILL a trainer `kills` times at random instants, an evaluator watching; return the committed steps.

    After each kill the state file must name a checkpoint that reads in full, and the relaunch must
    resume from exactly that one. Then a last start with fewer steps must leave exactly the listed
    checkpoints (`_check_orphans_removed`), and the evaluator must have recorded a checkpoint.
    """
    rng = random.Random(seed)
    storage = open_storage(workdir)
    watcher = subprocess.Popen([sys.executable, "-m", "evaluator.cli", "--workdir", workdir, "--data-dir",
                                str(data_dir), "--poll-secs", "0.5"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=REPO)
    committed: list[int] = []
    try:
        expected = "starting fresh"
        for _ in range(kills):
            before = storage.stat(checkpoints.STATE_FILE)
            proc, first = _launch_trainer(workdir, data_dir)
            assert first.startswith(expected), (first, expected)
            _await_commit(storage, before, proc)
            time.sleep(rng.uniform(0.0, 0.3))  # saves land every few tens of milliseconds: kills hit them
            proc.kill()
            proc.communicate(timeout=60)  # also closes its pipe
            step = committed_step(storage)
            if step is not None:
                committed.append(step)
                expected = f"resumed from model-{step} (step {step})"
        assert committed, "no commit before the kills"
        _check_orphans_removed(workdir, committed[-1], data_dir)
        _await_a_record(storage, watcher)
        assert watcher.poll() is None, "the evaluator died during the storm"
    finally:
        watcher.kill()
        watcher.wait(timeout=60)
    return committed


def _await_a_record(storage: Storage, watcher: subprocess.Popen[bytes]) -> None:
    """Wait until the evaluator has recorded a checkpoint, for at most a minute."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and watcher.poll() is None and not Ledger(storage).read():
        time.sleep(0.2)


def _check(workdir: str, committed: list[int], kills: int) -> None:
    assert len(committed) == kills and committed == sorted(committed)  # training went on from kill to kill
    rows = Ledger(open_storage(BucketPath(workdir))).read()
    assert rows and {r["status"] for r in rows} <= {"ok", "gone", "skipped"}  # never a partial checkpoint read


def _check_orphans_removed(workdir: str, step: int, data_dir: Path) -> None:
    """A last start with fewer steps than were saved leaves the store with exactly the checkpoints listed.

    Besides what the kills left, a checkpoint that a save uploaded but never listed is planted (its
    data without its index, as a kill during the upload leaves it), so that there is always one to remove.
    """
    storage = open_storage(workdir)
    state = checkpoints.read_state(storage)
    assert state is not None and state.latest is not None
    for key in storage.checkpoint_files(state.latest):
        if ".data-" in key:
            storage.write(key.replace(state.latest, f"model-{step + 1000}"), storage.read(key) or b"")
    last = subprocess.run([sys.executable, "-m", "trainer.cli", "--workdir", workdir, "--data-dir", str(data_dir),
                           "--model", "mlp", "--steps", str(step), "--keep", "3", "--progress", "plain"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert last.returncode == 0, last.stderr
    assert last.stdout.startswith(f"resumed from model-{step} (step {step})"), last.stdout  # as a relaunch does
    assert f"model-{step + 1000}" in last.stdout and "that the state file does not list" in last.stdout
    state = checkpoints.read_state(storage)
    assert state is not None
    listed = {Path(p).name for p in state.paths}
    stored = {n.partition(".")[0] for n in storage.names("", "model-*")}
    assert stored == listed, (stored, listed)


def test_kill_storm_with_an_evaluator_watching(bucket_workdir: str, tiny_data: Path) -> None:
    # 1 kill per store in `make test`, then the last start (about 10 s each: every start imports TF); 100 kills
    # in `make soak`.
    _check(bucket_workdir, kill_storm(bucket_workdir, tiny_data, kills=1), 1)


@pytest.mark.soak
def test_kill_storm_soak(bucket_workdir: str, tiny_data: Path) -> None:
    _check(bucket_workdir, kill_storm(bucket_workdir, tiny_data, kills=100, seed=1), 100)
