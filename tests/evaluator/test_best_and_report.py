"""Issue: best checkpoint, early stopping across processes, retention, reports and TensorBoard."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.checkpoint import checkpoints
from common.layout import EVAL_DIR, STOP_REQUEST_FILE
from common.run.ledger import Ledger
from common.run.protocol import LedgerRow
from common.run.workdir import Workdir
from common.storage import open_storage, read_best
from evaluator import best as best_lib
from evaluator import cli
from evaluator.config import EvalConfig
from evaluator.early_stop import without_improvement
from evaluator.loop import run_once
from evaluator.rows import Row
from evaluator.session import Session
from tests.helpers import Recorder, Spy, checkpoint_files, make_train_config, watch_beside
from trainer.loop import train


def config(workdir: Path, tiny_data: Path, **kw: Any) -> EvalConfig:
    return EvalConfig(workdir=workdir, data_dir=str(tiny_data), **kw)


def test_best_is_kept_with_its_files_and_json(workdir: Path, tiny_data: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir.parent)  # the workdir given relative to where the evaluator runs
    run_once(config(Path(workdir.name), tiny_data))
    records = [r for r in Ledger(open_storage(workdir)).read() if r["status"] == "ok"]
    top = max(records, key=lambda r: (r["accuracy"], -r["step"]))
    entry = read_best(open_storage(workdir))
    assert entry is not None and (entry["step"], entry["accuracy"]) == (top["step"], top["accuracy"])
    assert entry["source"] == str(workdir.resolve() / entry["checkpoint"])  # the same from any working directory
    best_dir = workdir / EVAL_DIR / "best"
    assert (best_dir / "best.json").read_text() == (workdir / EVAL_DIR / "best.json").read_text()
    assert checkpoints.read_step(best_dir / entry["checkpoint"]) == entry["step"]
    import tensorflow as tf

    assert tf.train.latest_checkpoint(str(best_dir)) == str(best_dir / entry["checkpoint"])
    assert [p.name for p in (workdir / EVAL_DIR).glob("best-*")] == [os.readlink(best_dir)]


def test_ties_keep_the_earlier_step() -> None:
    assert best_lib.improves(LedgerRow({"status": "ok", "accuracy": 0.9}), None)
    assert not best_lib.improves(LedgerRow({"status": "ok", "accuracy": 0.9}), {"accuracy": 0.9})
    assert best_lib.improves(LedgerRow({"status": "ok", "accuracy": 0.91}), {"accuracy": 0.9})
    assert not best_lib.improves(LedgerRow({"status": "error"}), None)


def test_crash_during_promotion_leaves_old_best_consistent(workdir: Path, tiny_data: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(config(workdir, tiny_data))
    listed = session.listed()
    session.evaluate(listed[0])
    before = read_best(open_storage(workdir))
    assert before is not None and before["checkpoint"] == "model-20"

    def crash(*_: Any) -> None:
        raise OSError("simulated crash while switching eval/best")

    monkeypatch.setattr(best_lib.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        best_lib.promote(Workdir.open(workdir), _fake_snapshot(workdir, "model-40"), LedgerRow({
            "step": 40, "accuracy": 1.0, "loss": 0.0, "split": "validation", "weights": "ema", "committed": 1.0}))
    monkeypatch.undo()
    after = read_best(open_storage(workdir))
    assert after == before  # best.json and eval/best/ still describe the same, old checkpoint
    assert (workdir / EVAL_DIR / "best" / "model-20.index").exists()
    best_lib.clean_stale(Workdir.open(workdir))  # what the next evaluator start does
    assert [p.name for p in (workdir / EVAL_DIR).glob("best-*")] == [os.readlink(workdir / EVAL_DIR / "best")]
    assert not list((workdir / EVAL_DIR).glob(".*.link-*"))


def _fake_snapshot(workdir: Path, name: str) -> Path:
    folder = workdir / EVAL_DIR / ".snapshot-999999999-test"
    folder.mkdir()
    for file in checkpoint_files(workdir / name):
        os.link(file, folder / file.name)
    return folder / name


def test_patience_counting() -> None:
    rows = [Row(step=s, checkpoint=f"model-{s}", status="ok", accuracy=a, value=a, score=a)
            for s, a in [(1, 0.5), (2, 0.6), (3, 0.6), (4, 0.605), (5, 0.59)]]
    count, best = without_improvement(rows, min_delta=0.0)
    assert (count, best.step if best else None) == (1, 4)
    count, best = without_improvement(rows, min_delta=0.01)
    assert (count, best.step if best else None) == (3, 2)
    # A metric where lower is better (--select validation:loss) ranks by its negative.
    by_loss = [Row(step=s, checkpoint=f"model-{s}", status="ok", value=v, score=-v) for s, v in [(1, 0.5), (2, 0.4),
                                                                                               (3, 0.45)]]
    count, best = without_improvement(by_loss, min_delta=0.0)
    assert (count, best.step if best else None) == (1, 2)


def test_retention_never_deletes_best(tiny_data: Path, tmp_path: Path) -> None:
    cfg = make_train_config(tiny_data, tmp_path / "run", steps=20, save_every=20, keep=1)
    train(cfg, reporter=Recorder())
    run_once(config(cfg.workdir, tiny_data))
    assert (read_best(open_storage(cfg.workdir)) or {})["checkpoint"] == "model-20"
    train(make_train_config(tiny_data, cfg.workdir, steps=80, save_every=20, keep=1), reporter=Recorder())
    state = checkpoints.read_state(open_storage(cfg.workdir))
    assert state is not None and state.paths == ["model-20", "model-80"]
    assert checkpoints.on_disk(open_storage(cfg.workdir)) == [20, 80]


def test_retention_never_deletes_a_leased_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    cfg = make_train_config(tiny_data, tmp_path / "run", steps=20, save_every=20, keep=1)
    train(cfg, reporter=Recorder())
    from evaluator.snapshot import lease

    with lease(open_storage(cfg.workdir), "model-20"):
        train(make_train_config(tiny_data, cfg.workdir, steps=60, save_every=20, keep=1), reporter=Recorder())
        assert checkpoints.on_disk(open_storage(cfg.workdir)) == [20, 60]
    train(make_train_config(tiny_data, cfg.workdir, steps=80, save_every=20, keep=1), reporter=Recorder())
    assert checkpoints.on_disk(open_storage(cfg.workdir)) == [80]  # released: the next save deletes it


def test_stop_request_end_to_end(tmp_path: Path, tiny_data: Path) -> None:
    """The evaluator's patience runs out; the real trainer stops before --steps, saves and exits 0."""
    workdir = tmp_path / "run"
    # An improvement of more than 50 points is impossible: the second evaluation exhausts patience 1.
    stop, out, err, code = watch_beside(
        "trainer.cli",
        ["--workdir", str(workdir), "--data-dir", str(tiny_data), "--model", "softmax", "--steps", "100000",
         "--save-every", "50", "--keep", "0", "--progress", "plain", "--log-every", "1000000"],
        config(workdir, tiny_data, exit_when_done=True, patience=1, min_delta=0.5), Spy())
    assert code == 0, err
    assert stop.reason is None
    request = json.loads((workdir / STOP_REQUEST_FILE).read_text())
    assert re.match(r"no improvement of more than 0.5 in \d+ evaluations \(best", request["reason"])
    stopped = [line for line in out.splitlines() if line.startswith("stopped early at step ")]
    assert stopped, out
    final_step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert final_step < 100_000 and final_step >= request["step"]
    done = json.loads((workdir / "done.json").read_text())
    assert done["step"] == final_step and done["stop_reason"].startswith("early stop requested by the evaluator")


def test_trainer_ignores_an_old_stop_request(make_config: Any) -> None:
    cfg = make_config(steps=40)
    train(cfg, reporter=Recorder())
    (cfg.workdir / STOP_REQUEST_FILE).write_text(json.dumps({"step": 20, "reason": "old"}))
    rec = Recorder()
    result = train(make_config(steps=80), reporter=rec)
    assert result.final_step == 80 and result.stopped_by is None
    assert "ignoring the evaluator's stop request of step 20 (before step 40)" in rec.messages


def drawn(path: Path) -> bool:
    """Whether `path` is a PNG with something drawn on it (not one flat colour)."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    return image.format == "PNG" and float(pixels.std()) > 1.0


def test_report_files(workdir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_once(config(workdir, tiny_data))
    step = (read_best(open_storage(workdir)) or {})["step"]
    assert cli.main(["report", "--workdir", str(workdir), "--data-dir", str(tiny_data)]) == 0
    out = workdir / EVAL_DIR / f"report-{step}"
    assert str(out) in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("confusion.png", "misclassified.png", "accuracy_curve.png"):
        assert drawn(out / name), name
    errors = sum(map(sum, metrics["confusion"])) - sum(row[i] for i, row in enumerate(metrics["confusion"]))
    assert metrics["misclassified_shown"] == min(errors, 36)  # the grid shows every error, up to 6 x 6
    assert sum(map(sum, metrics["confusion"])) == 50
    assert metrics["accuracy"] == pytest.approx((read_best(open_storage(workdir)) or {})["accuracy"])
    text = (out / "confusion.txt").read_text()
    assert "T-shirt/top" in text and "Ankle boot" in text
    assert len((out / "per_class.txt").read_text().splitlines()) == 10
    assert cli.main(["report", "--workdir", str(workdir), "--data-dir", str(tiny_data), "--step", "40",
                     "--split", "test"]) == 0
    assert json.loads((workdir / EVAL_DIR / "report-40" / "metrics.json").read_text())["split"] == "test"


@pytest.mark.parametrize(("setup", "step", "message"), [
    ("empty", "best", "the ledger is empty"),
    ("evaluated", "30", "step 30 is not in the ledger (evaluated steps: 20, 40, 60)"),
    ("deleted", "20", "step 20 is no longer on disk"),
    ("evaluated", "x", "--step ('x') must be a step number or 'best'"),
])
def test_report_bad_input_exit_2(setup: str, step: str, message: str, workdir: Path, tiny_data: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    if setup != "empty":
        run_once(config(workdir, tiny_data))
    if setup == "deleted":
        for file in checkpoint_files(workdir / "model-20"):
            file.unlink()
    code = cli.main(["report", "--workdir", str(workdir), "--data-dir", str(tiny_data), "--step", step])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_best_command(workdir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["best", "--workdir", str(workdir)]) == 2
    assert "no best checkpoint yet" in capsys.readouterr().err
    run_once(config(workdir, tiny_data))
    assert cli.main(["best", "--workdir", str(workdir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_best(open_storage(workdir))
    assert cli.main(["best", "--workdir", str(workdir)]) == 0
    assert capsys.readouterr().out.startswith("best: model-")


def test_tensorboard_logs_readable_by_tensorboard(workdir: Path, tiny_data: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    run_once(config(workdir, tiny_data, weights="both"))
    train_log = EventAccumulator(str(workdir / "tb" / "train"))
    train_log.Reload()
    assert {"loss", "lr", "steps_per_sec"} <= set(train_log.Tags()["tensors"])
    assert [e.step for e in train_log.Tensors("loss")][-1] == 60
    eval_log = EventAccumulator(str(workdir / "tb" / "eval"))
    eval_log.Reload()
    assert {"validation/accuracy/ema", "validation/accuracy/raw", "validation/loss/ema"} <= set(
        eval_log.Tags()["tensors"])
    accuracies = eval_log.Tensors("validation/accuracy/ema")
    ledger = {r["step"]: r["accuracy"] for r in Ledger(open_storage(workdir)).read() if r["weights"] == "ema"}
    assert {e.step: pytest.approx(float(tensor_util.make_ndarray(e.tensor_proto))) for e in accuracies} == ledger
