"""Several evaluators on one workdir: each checkpoint claimed, evaluated and recorded once; a killed holder's
claim taken over; eval/best always the maximum. Evaluators are real processes (`python -m evaluator.cli`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.layout import CLAIMS_DIR, EVAL_DIR
from common.run.ledger import Ledger
from common.run.locate import BEST, locate
from common.run.workdir import Workdir
from common.storage import Storage, open_storage
from common.storage.paths import BucketPath
from tests.cloud import Servers
from tests.helpers import REPO

SLOW_MODEL = "tests.byo_models:slow_eval"
CHECKPOINTS = [f"model-{s}" for s in range(10, 50, 10)]


def _location(workdir: str) -> Path | BucketPath:
    return BucketPath(workdir) if "://" in workdir else Path(workdir)


def start(module: str, args: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=os.environ | env)


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return out, err


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def claimed_by(storage: Storage, name: str) -> str | None:
    """The checkpoint whose claim evaluator `name` holds, if any."""
    for claim in storage.names(f"{EVAL_DIR}/{CLAIMS_DIR}"):
        if name.encode() in (storage.read(f"{EVAL_DIR}/{CLAIMS_DIR}/{claim}") or b""):
            return claim
    return None


def train_beside(workdir: str, data: Path) -> subprocess.Popen[str]:
    """A trainer committing CHECKPOINTS, one every 10 steps, of a model that is slow to evaluate where asked."""
    return start("trainer.cli", ["--workdir", workdir, "--data-dir", str(data), "--model", SLOW_MODEL, "--steps", "40",
                                 "--save-every", "10", "--steps-per-loop", "10", "--keep", "0", "--progress", "plain"])


def evaluator(workdir: str, data: Path, name: str, *extra: str, **env: str) -> subprocess.Popen[str]:
    # A bucket's poll every 0.5 s rather than 2: the trainer beside commits within a few seconds.
    return start("evaluator.cli", ["--workdir", workdir, "--data-dir", str(data), "--name", name, "--progress",
                                   "plain", "--poll-secs", "0.5", *extra], **env)


def check_shared(storage: Storage, expected: list[str], evaluators: set[str]) -> list[dict[str, Any]]:
    """Each checkpoint has one ok row, from one of `evaluators`; best is the maximum; no claim is left."""
    rows = [r for r in Ledger(storage).read() if r.get("split") == "validation" and r.get("weights") == "ema"]
    assert Counter(r["checkpoint"] for r in rows) == Counter(expected), rows
    assert all(r["status"] == "ok" and r["evaluator"] in evaluators for r in rows), rows
    best = Workdir(storage).best()
    top = max(rows, key=lambda r: (r["accuracy"], -r["step"]))
    assert best is not None and (best.checkpoint, best.accuracy) == (top["checkpoint"], top["accuracy"])
    located = locate(Workdir(storage), BEST)  # its folder is whole: every file read and checked
    assert located.key.endswith(top["checkpoint"])
    assert storage.names(f"{EVAL_DIR}/{CLAIMS_DIR}") == []
    return rows


def share_and_take_over(workdir: str, data: Path, names: tuple[str, ...], *, beside: bool = True) -> None:
    """A slow evaluator and the evaluators `names` watch a trainer (or a finished run, without `beside`); the slow
    one is killed in the middle of an evaluation and its checkpoint is taken over; every checkpoint is evaluated
    once, by the others."""
    storage = open_storage(_location(workdir))
    if not beside:  # trained in this process: one TensorFlow start less
        from tests.helpers import Recorder, make_train_config
        from trainer.loop import train

        train(make_train_config(data, _location(workdir), model=SLOW_MODEL, steps=40, save_every=10, keep=0),
              reporter=Recorder())
    trainer = train_beside(workdir, data) if beside else None
    slow = evaluator(workdir, data, "slow", "--exit-when-done", SLOW_EVAL_SECS="600")
    try:
        held = wait_for(lambda: claimed_by(storage, "slow"), "the slow evaluator's first claim")
        others = [evaluator(workdir, data, name, "--exit-when-done") for name in names]
        wait_for(lambda: any(r.get("evaluator") in names for r in Ledger(storage).read()),
                 "a row of the other evaluators")
        assert claimed_by(storage, "slow") == held  # still in the middle of its evaluation
        slow.send_signal(signal.SIGKILL)
        if trainer is not None:
            finish(trainer)
        outs = [finish(p)[0] for p in others]
    finally:
        for proc in (trainer, slow):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.communicate()
    rows = check_shared(storage, CHECKPOINTS, set(names))
    assert held in {r["checkpoint"] for r in rows}
    # Each live table shows every row, and names who evaluated it.
    for out in outs:
        shown = [line for line in out.splitlines() if " evaluator result " in line]
        assert {c for c in CHECKPOINTS if any(f"checkpoint={c} " in line for line in shown)} == set(CHECKPOINTS)
        assert all(any(f'evaluator="{name}"' in line for name in names) for line in shown), shown


def test_evaluators_share_a_local_workdir_and_take_over_a_killed_ones_claim(tmp_path: Path, tiny_data: Path) -> None:
    share_and_take_over(str(tmp_path / "run"), tiny_data, ("b", "c"))  # three evaluators


@pytest.mark.cloud
# GCS's claims are the same Storage.lock, which the storage contract suite runs on both stores; the
# whole scenario on GCS is a long variant.
@pytest.mark.parametrize("scheme", ["s3", pytest.param("gs", marks=pytest.mark.soak)])
def test_evaluators_share_a_bucket_workdir_and_take_over_a_killed_ones_claim(scheme: str, cloud: Servers,
                                                                             tiny_data: Path) -> None:
    # Two evaluators, on a finished run (the local test has the trainer beside: a TensorFlow start less here).
    share_and_take_over(f"{scheme}://{cloud.new_bucket(scheme)}/run", tiny_data, ("b",), beside=False)


def test_two_once_evaluators_started_together_list_each_checkpoint_once(trained_runs: Callable[..., Path],
                                                                          tmp_path: Path, tiny_data: Path) -> None:
    import shutil

    workdir = Path(shutil.copytree(trained_runs("softmax"), tmp_path / "run", symlinks=True))
    names = ["one", "two"]  # the contract: two `--once --json` started together
    procs = [evaluator(str(workdir), tiny_data, name, "--once", "--json") for name in names]
    outputs = [[json.loads(line) for line in finish(p)[0].splitlines()] for p in procs]
    expected = sorted(r["checkpoint"] for r in outputs[0])
    assert expected == ["model-20", "model-40", "model-60"]
    for name, rows in zip(names, outputs, strict=True):
        assert sorted(r["checkpoint"] for r in rows) == expected  # every evaluator lists every row
        assert all(r["evaluated_here"] == (r["evaluator"] == name) for r in rows), rows
    own = [r["checkpoint"] for rows in outputs for r in rows if r["evaluated_here"]]
    assert sorted(own) == expected  # the union of what each evaluated itself: each checkpoint once
    check_shared(open_storage(workdir), expected, set(names))


TFJOB = {"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"], "evaluator": ["127.0.0.1:3"]}}


def test_an_evaluator_task_evaluates_a_finished_run_then_exits(trained_runs: Callable[..., Path], tmp_path: Path,
                                                               tiny_data: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from tests.helpers import run_evaluator_cli

    workdir = Path(shutil.copytree(trained_runs("softmax"), tmp_path / "run", symlinks=True))
    # As a TFJob's Evaluator replica gets it; the chief finished before the evaluator started.
    monkeypatch.setenv("TF_CONFIG", json.dumps(TFJOB | {"task": {"type": "evaluator", "index": 0}}))
    code, out, err = run_evaluator_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--progress",
                                        "plain"], capsys)  # no --exit-when-done: the task implies it
    assert code == 0, err
    assert "TF_CONFIG names this process evaluator task 0: evaluating as a cluster of its own" in err
    assert "TF_CONFIG" not in os.environ  # TensorFlow never saw it: this process joined no cluster
    rows = Ledger(open_storage(workdir)).read()
    assert sorted((r["checkpoint"], r["evaluator"]) for r in rows) == [
        (f"model-{s}", "evaluator-0") for s in (20, 40, 60)]
    assert "trainer finished; all evaluated" in out


def test_the_trainer_refuses_an_evaluator_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import run_trainer_cli

    monkeypatch.setenv("TF_CONFIG", json.dumps(TFJOB | {"task": {"type": "evaluator", "index": 0}}))
    code, _, err = run_trainer_cli(["--workdir", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and "TF_CONFIG names an evaluator task: run `evaluator`" in err
    monkeypatch.setenv("TF_CONFIG", "{not json")
    code, _, err = run_trainer_cli(["--workdir", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not a JSON object with a task" in err


def test_trainer_runs_workers_and_evaluators_as_one_job(tmp_path: Path, tiny_data: Path) -> None:
    workdir = tmp_path / "run"
    # One worker of a multi-worker job whose TF_CONFIG lists the evaluators too (the trainer drops them).
    proc = start("trainer.cli", ["--workers", "1", "--evaluators", "2", "--workdir", str(workdir), "--data-dir",
                                 str(tiny_data), "--model", "softmax", "--steps", "40", "--save-every", "10",
                                 "--steps-per-loop", "10", "--keep", "0", "--progress", "plain"])
    out, err = finish(proc)
    assert "launching 2 evaluators (TF_CONFIG evaluator tasks) on the workdir" in out
    for j in (0, 1):
        assert f"[evaluator {j}] evaluator: TF_CONFIG names this process evaluator task {j}" in err
    assert any(line.startswith("[worker 0] ") and " trainer final step=40 " in line for line in out.splitlines())
    assert any(line.startswith("[evaluator ") and "trainer finished; all evaluated" in line
               for line in out.splitlines()), out
    check_shared(open_storage(workdir), [f"model-{s}" for s in (10, 20, 30, 40)], {"evaluator-0", "evaluator-1"})
