from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from common.checkpoint import checkpoints
from common.data.datasets import load
from common.errors import DivergedError, UsageError
from common.storage import open_storage
from tests.helpers import REPO, Recorder, checkpoint_files, listing
from tests.helpers import run_trainer_cli as run_cli
from trainer import loop as loop_mod
from trainer.inputs import train_dataset
from trainer.lock import WorkdirLock
from trainer.loop import train


def test_fresh_run_writes_checkpoints_state_and_keys(make_config: Callable[..., Any]) -> None:
    cfg = make_config(model="cnn", steps=60, save_every=20, keep=2)
    rec = Recorder()
    result = train(cfg, reporter=rec)
    assert rec.messages[0] == "starting fresh"
    assert (result.start_step, result.final_step, result.resumed_from) == (0, 60, None)
    names = sorted(p.name for p in cfg.workdir.iterdir() if not p.name.startswith("model-"))
    assert names == ["checkpoint", "done.json", "heartbeat.json", "run.json", "tb", "trainer.lock"]
    assert checkpoints.on_disk(open_storage(cfg.workdir)) == [40, 60]  # --keep 2
    for step in (40, 60):
        files = [p.name for p in checkpoint_files(cfg.workdir / f"model-{step}")]
        assert f"model-{step}.index" in files and any(".data-00000-of-" in f for f in files)
    tf_state = tf.train.get_checkpoint_state(str(cfg.workdir))
    assert tf_state.model_checkpoint_path == str(cfg.workdir / "model-60")
    assert tf.train.latest_checkpoint(str(cfg.workdir)) == str(cfg.workdir / "model-60")
    keys = {k for k, _ in tf.train.list_variables(str(cfg.workdir / "model-60"))}
    for path in ("global_step", "model/conv1/kernel", "model/fc2/bias", "ema/conv1/kernel", "ema/fc2/bias",
                 "optimizer/m/conv1/kernel", "optimizer/v/fc2/bias", "optimizer/iterations"):
        assert checkpoints.tensor_key(path) in keys, path
    assert checkpoints.read_step(cfg.workdir / "model-60") == 60
    run = json.loads((cfg.workdir / "run.json").read_text())
    assert (run["dataset"], run["model"], run["batch_size"]) == ("fashion-mnist", "cnn", 32)
    assert len(run["class_names"]) == 10
    done = json.loads((cfg.workdir / "done.json").read_text())
    assert done["step"] == 60 and done["checkpoint"] == "model-60"
    assert 0.0 <= result.metrics["test"]["accuracy"] <= 1.0 and result.metrics["validation"]["count"] == 50
    assert any("trainer final step=60 weights=ema" in m for m in rec.messages)


def test_training_learns_and_ema_differs_from_raw(make_config: Callable[..., Any]) -> None:
    cfg = make_config(model="mlp", steps=200, save_every=100, ema_decay=0.99)
    result = train(cfg, reporter=Recorder())
    assert result.metrics["validation"]["accuracy"] > 0.5  # chance is 0.1
    reader = tf.train.load_checkpoint(str(cfg.workdir / "model-200"))
    raw = reader.get_tensor(checkpoints.tensor_key("model/fc1/kernel"))
    ema = reader.get_tensor(checkpoints.tensor_key("ema/fc1/kernel"))
    assert raw.shape == ema.shape and not np.allclose(raw, ema)


def test_resume_continues_from_state_file(make_config: Callable[..., Any]) -> None:
    train(make_config(steps=40), reporter=Recorder())
    rec = Recorder()
    result = train(make_config(steps=80), reporter=rec)
    assert rec.messages[0] == "resumed from model-40 (step 40)"
    assert (result.start_step, result.final_step) == (40, 80)
    assert checkpoints.read_step(Path(result.final_checkpoint or "")) == 80


def test_edited_state_file_resumes_there_and_replaces_later(make_config: Callable[..., Any]) -> None:
    cfg = make_config(steps=60)
    train(cfg, reporter=Recorder())
    state_file = cfg.workdir / "checkpoint"
    lines = state_file.read_text().splitlines()
    state_file.write_text("\n".join(['model_checkpoint_path: "model-20"', *lines[1:]]) + "\n")
    old_60 = (cfg.workdir / "model-60.index").stat().st_mtime_ns
    rec = Recorder()
    result = train(cfg, reporter=rec)
    assert rec.messages[0] == "resumed from model-20 (step 20)"
    assert result.final_step == 60
    assert (cfg.workdir / "model-60.index").stat().st_mtime_ns > old_60
    state = checkpoints.read_state(open_storage(cfg.workdir))
    assert state is not None and state.latest == "model-60"
    assert sorted(state.paths, key=checkpoints.step_of) == ["model-20", "model-40", "model-60"]


def test_from_flag(make_config: Callable[..., Any]) -> None:
    train(make_config(steps=60), reporter=Recorder())
    rec = Recorder()
    result = train(make_config(steps=60, resume_from="model-20"), reporter=rec)
    assert rec.messages[0] == "resumed from model-20 (step 20)" and result.start_step == 20


def test_from_flag_bad_path(make_config: Callable[..., Any]) -> None:
    with pytest.raises(UsageError, match=r"--from model-999: model-999.index is missing"):
        train(make_config(resume_from="model-999"), reporter=Recorder())


def test_second_trainer_is_refused(make_config: Callable[..., Any]) -> None:
    cfg = make_config()
    cfg.workdir.mkdir(parents=True)
    lock = WorkdirLock(open_storage(cfg.workdir))
    with lock, pytest.raises(UsageError, match=r"another trainer is running on this workdir"):
        train(cfg, reporter=Recorder())


def test_non_finite_loss_stops_and_keeps_last_good(make_config: Callable[..., Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop_mod.make_train_loop

    def poisoned(state: Any, batch_size: int) -> Any:
        inner = real(state, batch_size)
        calls = []

        def loop(iterator: Any, n: Any) -> Any:
            calls.append(n)
            if len(calls) == 3:  # after model-20 was committed
                state.model.fc1.kernel.assign(tf.fill(state.model.fc1.kernel.shape, np.nan))
            return inner(iterator, n)

        return loop

    monkeypatch.setattr(loop_mod, "make_train_loop", poisoned)
    cfg = make_config(steps=60, save_every=20, steps_per_loop=10)
    with pytest.raises(DivergedError, match=r"non-finite loss between steps 20 and 30"):
        train(cfg, reporter=Recorder())
    assert tf.train.latest_checkpoint(str(cfg.workdir)) == str(cfg.workdir / "model-20")
    assert not (cfg.workdir / "model-40.index").exists()


def test_data_order_is_a_function_of_step(tiny_data: Path) -> None:
    data = load("mnist", str(tiny_data))
    split = data.train

    def batches(start: int, n: int) -> list[np.ndarray]:
        ds = train_dataset(split, batch_size=50, seed=3, start_step=start,
                           prepare=lambda x: data.info.preprocessing.apply(x, data.info.input_spec))
        return [y.numpy() for _, y in ds.take(n)]

    full, later = batches(0, 25), batches(13, 12)
    for a, b in zip(full[13:], later, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(full[0], full[11])  # epoch 2 is shuffled anew


def test_the_training_pipeline_runs_without_the_autotuning_thread(tiny_data: Path) -> None:
    # Its iterator could take tens of seconds to drop at the end of a run (trainer/inputs.py).
    split = load("mnist", str(tiny_data)).train
    ds = train_dataset(split, batch_size=50, seed=3, start_step=0, prepare=lambda x: tf.cast(x, tf.float32))
    assert ds.options().autotune.enabled is False


@pytest.mark.parametrize(("flags", "message"), [
    (["--dataset", "cifar"], "unknown dataset 'cifar'"),
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--steps", "0"], "--steps (0) must be a positive integer"),
    (["--steps", "-5"], "--steps (-5) must be a positive integer"),
    (["--lr", "-1"], "--lr (-1.0) must be positive"),
    (["--keep", "-1"], "--keep (-1) must be 0"),
])
def test_bad_flags_exit_2(flags: list[str], message: str, tmp_path: Path, tiny_data: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "w"
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), *flags], capsys)
    assert code == 2
    assert err.startswith("trainer: error: ") and message in err and err.count("\n") == 1
    assert not workdir.exists()


def test_unwritable_workdir(tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["--workdir", str(tmp_path / "file" / "w"), "--data-dir", str(tiny_data)], capsys)
    assert code == 2 and "is not a folder" in err


def test_missing_data_exit_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["--workdir", str(tmp_path / "w"), "--data-dir", str(tmp_path)], capsys)
    assert code == 4 and "no complete set of IDX files" in err and not (tmp_path / "w").exists()


def test_resume_takes_run_json_and_refuses_contradiction(tmp_path: Path, tiny_data: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    workdir = str(tmp_path / "w")
    base = ["--workdir", workdir, "--data-dir", str(tiny_data), "--save-every", "20", "--progress", "plain"]
    assert run_cli([*base, "--model", "mlp", "--batch-size", "16", "--steps", "20"], capsys)[0] == 0
    before = listing(Path(workdir))
    code, _, err = run_cli([*base, "--model", "cnn", "--steps", "40"], capsys)
    assert code == 2 and "run.json disagrees with the flags given (model: 'mlp' != 'cnn')" in err
    assert listing(Path(workdir)) == before
    code, out, _ = run_cli([*base, "--steps", "40"], capsys)  # no --model: run.json's mlp
    assert code == 0 and out.splitlines()[0] == "resumed from model-20 (step 20)"


def test_label_smoothing_is_the_models_default_a_flag_and_kept_on_resume(
        tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from common.run.spec import read_run

    base = ["--data-dir", str(tiny_data), "--steps", "10", "--save-every", "10", "--progress", "plain"]
    for flags, expected in ((["--model", "cnn3x3"], 0.1), (["--model", "cnn"], 0.0),
                            (["--model", "cnn3x3", "--label-smoothing", "0"], 0.0),
                            (["--model", "softmax", "--label-smoothing", "0.2"], 0.2)):
        workdir = tmp_path / "-".join(flags)
        code, _, err = run_cli(["--workdir", str(workdir), *base, *flags], capsys)
        assert code == 0, err
        spec = read_run(open_storage(workdir))
        assert spec is not None and spec.label_smoothing == expected, flags
    # A run.json from before the setting existed resumes without smoothing, whatever the model.
    workdir = tmp_path / "--model-cnn3x3"
    run_file = workdir / "run.json"
    record = json.loads(run_file.read_text())
    del record["label_smoothing"]
    run_file.write_text(json.dumps(record))
    code, out, err = run_cli(["--workdir", str(workdir), *base[:2], "--steps", "20", "--progress", "plain"], capsys)
    assert code == 0 and out.splitlines()[0] == "resumed from model-10 (step 10)", err
    code, _, err = run_cli(["--workdir", str(tmp_path / "bad"), *base, "--label-smoothing", "1"], capsys)
    assert code == 2 and "--label-smoothing (1.0) must be in [0, 1)" in err


def test_smoothed_cross_entropy_matches_its_formula() -> None:
    from trainer.step import _cross_entropy

    logits = tf.constant([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    labels = tf.constant([0, 1], tf.int64)
    plain = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    np.testing.assert_allclose(_cross_entropy(labels, logits, 0.0), plain)
    log_p = tf.nn.log_softmax(logits).numpy()
    targets = np.eye(3)[[0, 1]] * 0.7 + 0.1
    np.testing.assert_allclose(_cross_entropy(labels, logits, 0.3), -(targets * log_p).sum(axis=1), rtol=1e-6)


def test_garbage_run_json(tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "run.json").write_text("{not json")
    code, _, err = run_cli(["--workdir", str(tmp_path / "w"), "--data-dir", str(tiny_data)], capsys)
    assert code == 2 and "run.json: unreadable run file" in err


def test_sigterm_saves_and_exits_0(tmp_path: Path, tiny_data: Path) -> None:
    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "trainer.cli", "--workdir", str(workdir), "--data-dir", str(tiny_data),
           "--model", "softmax", "--steps", "1000000", "--save-every", "100000", "--log-every", "50"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until training runs
        if " progress " in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at step ")
    step = int(last.split("at step ")[1].split(";")[0])
    assert tf.train.latest_checkpoint(str(workdir)) == str(workdir / f"model-{step}")
    assert not (workdir / "done.json").exists()


def test_help_does_not_need_tensorflow() -> None:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "import sys; from trainer.cli import parser; parser(); "
                          "print('tensorflow' in sys.modules)"], capture_output=True, text=True, check=True,
                         cwd=REPO)
    assert out.stdout.strip() == "False", time.perf_counter() - started


def test_mnist_on_generated_idx_files(make_config: Callable[..., Any]) -> None:
    cfg = make_config(dataset="mnist", model="mlp", steps=20)
    train(cfg, reporter=Recorder())
    run = json.loads((cfg.workdir / "run.json").read_text())
    assert run["dataset"] == "mnist" and run["class_names"] == [str(d) for d in range(10)]


def test_the_default_run_is_cnn3x3_with_its_recipe_and_the_evaluator_watches_it() -> None:
    from evaluator.cli import DEFAULT_WORKDIR
    from trainer.cli import build_config, parser

    cfg = build_config(parser().parse_args([]))
    assert cfg.workdir == DEFAULT_WORKDIR and cfg.spec.model == "cnn3x3"
    assert (cfg.steps, cfg.spec.label_smoothing) == (9000, 0.1)  # its recipe (common.model.models.recipe)
    tutorial = build_config(parser().parse_args(["--model", "cnn"]))
    assert (tutorial.steps, tutorial.spec.label_smoothing) == (10000, 0.0)
