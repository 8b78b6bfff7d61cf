"""Training under `tf.distribute` in this process: MirroredStrategy over the two logical CPUs of the tests.

conftest splits the CPU into two logical devices, so these runs take the same code path as a
machine with two GPUs: the global batch is cut in two, and the gradients are summed across replicas.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from common.checkpoint import checkpoints
from common.cluster import tf_config
from common.distribute import Topology, lost_worker_errors, topology
from common.errors import EXIT_WORKER_LOST, UsageError, WorkerLostError
from common.run.spec import read_run
from common.signals import StopRequest
from common.storage import open_storage
from tests.helpers import Recorder, make_train_config, mirrored
from tests.helpers import run_trainer_cli as run_cli
from trainer.actions import LoopOutput
from trainer.distribute import Peers, distributed_batches
from trainer.launcher import _first_failure, free_ports
from trainer.loop import restore, train
from trainer.step import TrainState, make_train_loop
from trainer.warmstart import InitSpec

# After 50 mlp steps from one seed, two replicas (mirrored, or two workers) and one device differed
# by at most 7.8e-8 in any weight, shadow or Adam slot: the gradient is summed in another order.
TOLERANCE = 1e-6


def tensors(prefix: str | Path) -> dict[str, np.ndarray]:
    """Every saved tensor of a checkpoint by key, the object graph left out."""
    reader = tf.train.load_checkpoint(str(prefix))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if "OBJECT_GRAPH" not in k}


def assert_same_weights(a: str | Path, b: str | Path, tolerance: float = TOLERANCE) -> None:
    """Both checkpoints hold the same keys (model, EMA, optimizer, step), with values within `tolerance`."""
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    assert any(k.startswith("ema/") for k in ta) and any(k.startswith("optimizer/m/") for k in ta)
    worst = max(float(np.max(np.abs(ta[k].astype(np.float64) - tb[k]))) for k in ta)
    assert worst <= tolerance, f"largest difference {worst:.3g}"


def test_mirrored_reaches_the_default_strategys_weights(tiny_data: Path, tmp_path: Path) -> None:
    one = make_train_config(tiny_data, tmp_path / "one", model="mlp", steps=50, save_every=50)
    two = make_train_config(tiny_data, tmp_path / "two", model="mlp", steps=50, save_every=50)
    train(one, reporter=Recorder())
    rec = Recorder()
    result = train(two, reporter=rec, strategy=mirrored())
    assert "strategy mirrored: 1 worker, 2 replicas, chief this process" in rec.messages
    assert result.final_step == 50 and result.metrics["test"]["accuracy"] > 0.5
    assert_same_weights(one.workdir / "model-50", two.workdir / "model-50")
    run = json.loads((two.workdir / "run.json").read_text())
    assert (run["strategy"], run["replicas"], run["workers"]) == ("mirrored", 2, 1)


def test_replicas_hold_identical_shadows_and_slots_after_a_restore(make_config: Callable[..., Any]) -> None:
    cfg = make_config(model="mlp", steps=20, save_every=20, ema_decay=0.9)
    strategy = mirrored()
    train(cfg, reporter=Recorder(), strategy=strategy)
    spec = read_run(open_storage(cfg.workdir))
    assert spec is not None
    state = TrainState(spec, strategy)
    assert restore(state, cfg.workdir / "model-20") == 20
    saved = tensors(cfg.workdir / "model-20")
    for path, shadow in state.ema.shadows.items():
        np.testing.assert_array_equal(shadow.numpy(), saved[checkpoints.tensor_key(f"ema/{path}")])
    assert_replicas_agree(strategy, state)
    batches = distributed_batches(strategy, load_data(cfg).train, batch_size=spec.batch_size, seed=0, start_step=20,
                                  prepare=spec.prepare)
    make_train_loop(state, spec.batch_size)(iter(batches), tf.constant(5))  # and they stay equal when trained on
    assert int(state.step.numpy()) == 25
    assert_replicas_agree(strategy, state)


def assert_replicas_agree(strategy: tf.distribute.Strategy, state: TrainState) -> None:
    """Every EMA shadow and Adam slot holds the same value on both replicas."""
    named = [*state.ema.shadows.items(), *_slots(state)]
    assert len(named) == 3 * len(state.ema.shadows) > 0
    for name, var in named:
        copies = [v.numpy() for v in strategy.experimental_local_results(var)]
        assert len(copies) == 2 and np.array_equal(copies[0], copies[1]), name


def load_data(cfg: Any) -> Any:
    return cfg.spec.load_data(cfg.data_dir).data


def _slots(state: TrainState) -> list[tuple[str, tf.Variable]]:
    return [(f"optimizer/{kind}/{layer}/{attr}", var) for kind, tree in (("m", state.optimizer.m),
                                                                          ("v", state.optimizer.v))
            for layer, attrs in tree.items() for attr, var in attrs.items()]


def test_batch_that_does_not_divide_is_one_line(make_config: Callable[..., Any], tiny_data: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_config(batch_size=33)
    with pytest.raises(UsageError, match=r"--batch-size \(33\) must be a multiple of the 2 replicas \(mirrored\)"):
        train(cfg, reporter=Recorder(), strategy=mirrored())
    assert not cfg.workdir.exists()
    code, _, err = run_cli(["--workdir", str(tmp_path / "w"), "--data-dir", str(tiny_data), "--batch-size", "33",
                            "--strategy", "mirrored", "--devices", "2", "--progress", "plain"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("trainer: error: --batch-size (33)")


@pytest.mark.parametrize(("flags", "env", "message"), [
    (["--devices", "2"], None, "--devices (2) goes with --strategy mirrored"),
    (["--workers", "2", "--strategy", "mirrored"], None, "--workers runs a multi-worker job; drop --strategy mirrored"),
    (["--strategy", "multi-worker"], None, "--strategy multi-worker needs TF_CONFIG"),
    (["--strategy", "multi-worker"], "{not json", "TF_CONFIG ('{not json') is not a JSON object"),
    (["--strategy", "multi-worker"], '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", '
                                     '"index": 3}}', "task worker 3 is not in the cluster's 1 worker address"),
    (["--collective-timeout", "0"], None, "--collective-timeout (0.0) must be positive"),
])
def test_distribution_flags_refused_with_one_line(flags: list[str], env: str | None, message: str, tiny_data: Path,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if env is not None:
        monkeypatch.setenv("TF_CONFIG", env)
    else:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    code, _, err = run_cli(["--workdir", str(tmp_path / "w"), "--data-dir", str(tiny_data), *flags], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "w").exists()


def test_resume_on_another_number_of_replicas_says_so(make_config: Callable[..., Any]) -> None:
    train(make_config(model="mlp", steps=20), reporter=Recorder())
    rec = Recorder()
    result = train(make_config(model="mlp", steps=40), reporter=rec, strategy=mirrored())
    assert rec.messages[0] == "resumed from model-20 (step 20)" and result.final_step == 40
    assert any(m.startswith("run.json records 1 replica(s) (default, 1 worker(s)) at the first start; "
                            "this start runs 2") for m in rec.messages), rec.messages


def test_freeze_init_from_and_classes_under_mirrored(make_config: Callable[..., Any], tiny_data: Path,
                                                     tmp_path: Path) -> None:
    source = make_train_config(tiny_data, tmp_path / "source", model="mlp", steps=20, save_every=20)
    train(source, reporter=Recorder())
    cfg = make_config(model="mlp", steps=20, save_every=20, classes=(5, 7, 8), freeze=("model/fc1/*",),
                      init=InitSpec(str(source.workdir), only=("model/fc1/*",)))
    rec = Recorder()
    train(cfg, reporter=rec, strategy=mirrored())
    before, after = tensors(source.workdir / "model-20"), tensors(cfg.workdir / "model-20")
    for attr in ("kernel", "bias"):  # restored from the source's EMA weights, then never trained
        key = checkpoints.tensor_key(f"model/fc1/{attr}")
        np.testing.assert_array_equal(after[key], before[checkpoints.tensor_key(f"ema/fc1/{attr}")])
    assert after[checkpoints.tensor_key("model/fc2/kernel")].shape == (500, 3)
    assert json.loads((cfg.workdir / "run.json").read_text())["classes"] == [5, 7, 8]
    assert topology(mirrored()).replicas == 2


def test_stop_requests_become_the_stop_of_every_worker_after_an_exchange() -> None:
    out = LoopOutput(first_step=0, step=10, loss=0.1, all_finite=True, steps_per_sec=1.0, lr=1e-3)
    for reason, finish in (("early stop requested by the evaluator: patience", True), ("SIGTERM", False)):
        stop = StopRequest()
        peers = Peers(mirrored(), stop)
        peers(out)
        assert not stop
        peers.requests.set(reason, finish=finish)
        assert not stop  # a request alone changes nothing until the workers exchanged it
        peers(out)
        assert (stop.reason, stop.finish) == (reason, finish)
    peers.same_start(20)  # every replica restored step 20


@pytest.mark.parametrize(("error", "message"), [
    (tf.errors.UnavailableError(None, None, "failed to connect\nremote target /job:worker/replica:0/task:1 ..."),
     "worker 0: lost contact with worker 1 (UnavailableError)"),
    (tf.errors.DeadlineExceededError(None, None, "Collective has timed out during execution."),
     "worker 0: a collective timed out"),
])
def test_a_failed_collective_becomes_one_line_naming_the_lost_worker(error: Exception, message: str) -> None:
    two = Topology("multi-worker", workers=2, worker=0, replicas=2, chief=True)
    with pytest.raises(WorkerLostError, match=re.escape(message)), lost_worker_errors(two):
        raise error
    with pytest.raises(type(error)), lost_worker_errors(dataclasses.replace(two, workers=1)):
        raise error  # one process: nothing was lost, the error stays what it is


def test_launcher_names_the_worker_that_died_or_hung_not_the_one_that_lost_it() -> None:
    assert _first_failure([(0, EXIT_WORKER_LOST), (1, -signal.SIGKILL)], running=[]) == (
        137, "worker 1 was lost (killed by SIGKILL)")
    assert _first_failure([(1, 5)], running=[0]) == (5, "worker 1 failed (exit code 5); ended the other workers")
    assert _first_failure([(0, EXIT_WORKER_LOST)], running=[1]) == (  # worker 1 hung: it is named
        6, "worker 1 stopped answering (worker 0 lost contact, exit code 6); ended worker 1")
    assert _first_failure([(1, -signal.SIGTERM)], running=[0], forwarded={-signal.SIGTERM}) == (
        143, "worker 1 was ended by the SIGTERM forwarded to it, outside training; ended the other workers")
    ports = free_ports(3)
    assert len(set(ports)) == 3
    config = json.loads(tf_config({"worker": [f"127.0.0.1:{p}" for p in ports]}, "worker", 2))
    assert config["task"] == {"type": "worker", "index": 2} and len(config["cluster"]["worker"]) == 3
