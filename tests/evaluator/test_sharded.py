"""`evaluator --strategy mirrored|multi-worker`: each checkpoint evaluated in shards gives one device's figures.

The validation split of the tiny run (50 examples in one batch of at most 1,000) divides neither by
three replicas nor by the batch. The runs that need processes of their own (three logical CPUs,
two workers) each cost a TensorFlow start, so they start together, once for the module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tensorflow as tf

from common.checkpoint import checkpoints
from common.cluster import tf_config
from common.run.ledger import FAILED, Ledger
from common.storage import open_storage
from evaluator.cluster import CANNOT_PIN, NOT_THE_CHIEFS, Cluster, Order, code
from evaluator.config import EvalConfig
from evaluator.core import CheckpointEvaluator
from evaluator.loop import run_once
from evaluator.session import Session
from tests.helpers import REPO, mirrored, run_evaluator_cli
from trainer.launcher import free_ports

FLAGS = ["--once", "--json", "--weights", "both"]
EXACT = ("status", "step", "accuracy", "per_class_accuracy", "confusion", "count", "examples")


@dataclasses.dataclass(frozen=True)
class Ran:
    """One evaluator process, finished."""

    code: int
    rows: list[dict[str, Any]]  # its --json lines
    err: str


def start(workdir: Path, data: Path, flags: list[str], tf_config_text: str | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    if tf_config_text is not None:
        env["TF_CONFIG"] = tf_config_text
    return subprocess.Popen([sys.executable, "-m", "evaluator.cli", "--workdir", str(workdir), "--data-dir", str(data),
                             *FLAGS, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=env)


def finish(proc: subprocess.Popen[str]) -> Ran:
    out, err = proc.communicate(timeout=180)
    return Ran(proc.returncode, [json.loads(line) for line in out.splitlines()], err)


@pytest.fixture(scope="module")
def sharded(trained_runs: Callable[..., Path], tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[Path, Ran]]:
    """`mirrored --devices 3` in one process, and `multi-worker` over a chief and a worker, each on a copy."""
    root = tmp_path_factory.mktemp("sharded")
    three, two = (Path(shutil.copytree(trained_runs(), root / name)) for name in ("three", "two"))
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    configs = [tf_config({"worker": addresses}, "worker", i) for i in range(2)]
    procs = {"three": (three, start(three, tiny_data, ["--strategy", "mirrored", "--devices", "3"])),
             **{role: (two, start(two, tiny_data, ["--strategy", "multi-worker"], configs[i]))
                for i, role in enumerate(("chief", "worker"))}}
    return {name: (workdir, finish(proc)) for name, (workdir, proc) in procs.items()}


@pytest.fixture(scope="module")
def alone(trained_runs: Callable[..., Path], tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> list[dict[str, Any]]:
    """The ledger rows of one device (the default strategy), evaluated in this process."""
    workdir = Path(shutil.copytree(trained_runs(), tmp_path_factory.mktemp("alone") / "run"))
    run_once(EvalConfig(workdir=workdir, data_dir=str(tiny_data), weights="both"))
    return list(Ledger(open_storage(workdir)).read())


def assert_same_figures(rows: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """The same checkpoints and weights, every figure equal, the loss to 1e-6."""
    by_key = {(r["checkpoint"], r["weights"]): r for r in expected}
    assert sorted((r["checkpoint"], r["weights"]) for r in rows) == sorted(by_key)
    assert {r["status"] for r in rows} == {"ok"}
    for row in rows:
        want = by_key[row["checkpoint"], row["weights"]]
        assert {k: row[k] for k in EXACT} == {k: want[k] for k in EXACT}
        assert abs(row["loss"] - want["loss"]) <= 1e-6, (row["loss"], want["loss"])
        assert row["count"] == sum(map(sum, row["confusion"])) == 50


@pytest.mark.slow
def test_mirrored_over_three_devices_gives_one_devices_figures(sharded: dict[str, tuple[Path, Ran]],
                                                               alone: list[dict[str, Any]]) -> None:
    _, ran = sharded["three"]
    assert ran.code == 0, ran.err
    assert "evaluator: strategy mirrored: 1 worker, 3 replicas, chief this process" in ran.err
    assert_same_figures(ran.rows, alone)


@pytest.mark.slow
def test_two_worker_processes_give_one_devices_figures(sharded: dict[str, tuple[Path, Ran]],
                                                      alone: list[dict[str, Any]]) -> None:
    workdir, chief = sharded["chief"]
    _, worker = sharded["worker"]
    assert chief.code == 0 and worker.code == 0, (chief.err, worker.err)
    assert "strategy multi-worker: 2 workers, 2 replicas, chief worker 0 (127.0.0.1:" in chief.err
    assert "evaluator: worker 1: took part in 3 evaluation(s); the chief is done" in worker.err
    assert worker.rows == []  # only the chief records and prints
    assert_same_figures(chief.rows, alone)
    assert len(Ledger(open_storage(workdir)).read()) == 6
    assert not list((workdir / "eval").glob(".snapshot-*"))  # both released their pinned copies


def test_mirrored_in_this_process_gives_one_devices_figures(workdir: Path, tiny_data: Path,
                                                            alone: list[dict[str, Any]]) -> None:
    cfg = EvalConfig(workdir=workdir, data_dir=str(tiny_data), weights="both", strategy="mirrored", devices=2)
    session = run_once(cfg, cluster=Cluster(mirrored()))
    assert session.core is not None and session.core.evaluate_model.strategy is mirrored()
    assert_same_figures(list(Ledger(open_storage(workdir)).read()), alone)


class Recorded(Cluster):
    """Another process's side, played here: it answers `agree` with `theirs` and records what it was told."""

    def __init__(self, theirs: int = 0) -> None:
        super().__init__(tf.distribute.get_strategy())
        self.theirs = theirs
        self.told: list[tuple[int, int]] = []
        self.said: list[int] = []

    @property
    def together(self) -> bool:
        return True

    def same_data(self, fingerprint: str, examples: int) -> None:
        pass

    def tell(self, step: int, fingerprint: str | None) -> None:
        self.told.append((step, code(fingerprint)))

    def agree(self, problem: int) -> dict[int, int]:
        self.said.append(problem)
        return {w: p for w, p in ((0, problem), (1, self.theirs)) if p}


def test_a_worker_that_cannot_take_part_makes_the_chiefs_records_failed(workdir: Path, tiny_data: Path) -> None:
    cluster = Recorded(theirs=CANNOT_PIN)
    session = Session(EvalConfig(workdir=workdir, data_dir=str(tiny_data), weights="both"), cluster=cluster)
    first = session.listed()[0]
    rows = session.evaluate(first)
    assert [(r.status, r.reason) for r in rows] == [(FAILED, "worker 1 could not pin it (model-20)")] * 2
    assert cluster.told == [(20, code(checkpoints.index_fingerprint(open_storage(workdir), "model-20")))]
    assert cluster.said == [0]  # the chief read the EMA weights; the worker's problem ended the round
    assert first in session.deferred and first not in session.pending(session.listed())
    session.deferred.clear()  # the next scan cycle retries it: it is not recorded as done
    assert session.pending(session.listed())[0] == first


def test_a_worker_takes_part_only_in_the_chiefs_checkpoint(workdir: Path, tiny_data: Path) -> None:
    cluster = Recorded()
    core = Session(EvalConfig(workdir=workdir, data_dir=str(tiny_data), weights="both"), cluster=cluster).prepare()
    assert isinstance(core, CheckpointEvaluator)
    core.take_part(Order(40, fingerprint=code("another checkpoint's .index")))
    core.take_part(Order(60, fingerprint=code(checkpoints.index_fingerprint(open_storage(workdir), "model-60"))))
    core.take_part(Order(80, fingerprint=0))  # no such checkpoint
    assert cluster.said == [NOT_THE_CHIEFS, 0, 0, CANNOT_PIN]
    assert not list((workdir / "eval").glob(".snapshot-*"))


@pytest.mark.parametrize(("flags", "tf_config_text", "message"), [
    (["--devices", "2"], None, "--devices (2) goes with --strategy mirrored"),
    (["--strategy", "multi-worker"], None, "--strategy multi-worker needs TF_CONFIG (cluster and task); each "
                                           "evaluator process a chief or worker task"),
    (["--strategy", "multi-worker"], '{"task": {"type": "evaluator", "index": 0}}',
     "TF_CONFIG: task type 'evaluator': --strategy multi-worker runs evaluators as the chief and worker tasks"),
    (["--strategy", "mirrored", "--tf1-graph", "--input", "x:0", "--output", "y:0", "--dataset", "mnist"], None,
     "--strategy mirrored goes with this project's runs and --model, not --tf1-graph"),
    (["--strategy", "multi-worker", "--model", "mlp", "--dataset", "mnist"], None,
     "--strategy multi-worker goes with this project's runs, not --model"),
])
def test_strategies_that_do_not_fit_are_refused_with_one_line(
        flags: list[str], tf_config_text: str | None, message: str, workdir: Path, tiny_data: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if tf_config_text is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config_text)
    code, out, err = run_evaluator_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once", *flags],
                                       capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert not (workdir / "eval").exists()
