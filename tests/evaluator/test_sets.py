"""Several evaluation sets and metrics per checkpoint: --split twice, --eval-data, --select, --top-k, --metric."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from common.data import datasets
from common.model.evaluation import Evaluation
from common.model.metrics import UserMetric
from common.run.ledger import Ledger
from common.run.workdir import Workdir
from common.signals import StopRequest
from common.storage import open_storage, read_best
from evaluator.config import EvalConfig
from evaluator.display import PlainLines
from evaluator.loop import run_watch
from evaluator.rows import Row, SetResult
from evaluator.session import Session
from evaluator.sets import SetError
from tests.helpers import Spy, mirrored, mnist_model
from tests.helpers import run_evaluator_cli as run_cli

# Classes of the tiny data (fashion-mnist's names) that a folder set holds: fewer than the run has.
FOLDER_CLASSES = {0: "T-shirt_top", 2: "Pullover", 8: "Bag"}  # T-shirt/top: no '/' in a folder's name
# What a row's evaluation measured, as opposed to when and by whom.
MEASURED = ("accuracy", "loss", "per_class_accuracy", "confusion", "count", "examples", "data_fingerprint",
            "checkpoint", "step", "split", "weights", "status", "index_fingerprint")


def image_folder(root: Path, tiny_data: Path, *, classes: dict[int, str] = FOLDER_CLASSES, per_class: int = 12) -> Path:
    """A folder set of class subfolders of PNGs cut from the tiny test images."""
    test = datasets.load("fashion-mnist", str(tiny_data)).test
    for label, name in classes.items():
        (root / name).mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(test.labels == label)[:per_class]):
            Image.fromarray(test.images[index]).save(root / name / f"{i}.png")
    return root


def evaluate_json(workdir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> list[Any]:
    code, out, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once", "--json", *flags],
                             capsys)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def measured(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in MEASURED}


def test_sets_end_to_end(workdir: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation, test and a folder set: one pin per checkpoint, a row per set, table, TensorBoard, best --select."""
    alone = Path(shutil.copytree(workdir, tmp_path / "alone", symlinks=True))
    folder = image_folder(tmp_path / "shifted", tiny_data)
    pins: list[str] = []
    real_pin = Workdir.pin
    monkeypatch.setattr(Workdir, "pin", lambda self, name: pins.append(name) or real_pin(self, name))
    flags = ["--split", "validation", "--split", "test", "--eval-data", f"shifted=folder:{folder}", "--top-k", "3",
             "--metric", "tests.user_metrics:hits", "--metric", "tests.user_metrics:mean_margin"]
    rows = evaluate_json(workdir, tiny_data, capsys, *flags)
    assert sorted(pins) == ["model-20", "model-40", "model-60"]  # every set from the one pinned copy
    assert sorted((r["step"], r["split"]) for r in rows) == [(s, n) for s in (20, 40, 60)
                                                             for n in ("shifted", "test", "validation")]
    assert all(r["status"] == "ok" and r["weights"] == "ema" for r in rows)
    by_set = {(r["step"], r["split"]): r for r in rows}
    assert {r["examples"] for r in rows if r["split"] == "shifted"} == {12 * len(FOLDER_CLASSES)}
    for r in rows:
        confusion = np.array(r["confusion"])
        assert confusion.sum() == r["count"] == r["examples"]
        assert r["metrics"]["hits"] == pytest.approx(r["accuracy"], abs=1e-12)  # reduced exactly
        assert r["accuracy"] <= r["metrics"]["top3_accuracy"] <= 1.0
    # The folder's labels are the run's classes, found by name: no example is of another class.
    shifted = np.array(by_set[60, "shifted"]["confusion"])
    assert set(np.flatnonzero(shifted.sum(axis=1))) == set(FOLDER_CLASSES)
    # The contract: the validation rows are those of --split validation alone.
    only = evaluate_json(alone, tiny_data, capsys, "--split", "validation")
    assert [measured(r) for r in only] == [measured(by_set[r["step"], "validation"]) for r in only]
    ledger = Ledger(open_storage(workdir)).read()
    assert len(ledger) == 9 and len({(r["checkpoint"], r["split"], r["weights"]) for r in ledger}) == 9
    _check_tensorboard(workdir, by_set)
    _check_table(workdir, tiny_data, capsys, flags)
    _check_best_select(workdir, capsys, rows)
    # The name stands for its data: other images under it would mix with its results.
    other = image_folder(tmp_path / "other", tiny_data, classes={2: "Pullover"}, per_class=5)
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once", "--eval-data",
                            f"shifted=folder:{other}"], capsys)
    assert code == 2 and "the ledger holds results of other data under the name 'shifted'" in err


def _check_tensorboard(workdir: Path, by_set: dict[tuple[int, str], Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    log = EventAccumulator(str(workdir / "tb" / "eval"))
    log.Reload()
    tags = set(log.Tags()["tensors"])
    for name in ("validation", "test", "shifted"):
        assert {f"{name}/{m}/ema" for m in ("accuracy", "loss", "top3_accuracy", "hits", "mean_margin")} <= tags
    logged = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in log.Tensors("shifted/accuracy/ema")}
    assert logged == {s: pytest.approx(by_set[s, "shifted"]["accuracy"]) for s in (20, 40, 60)}


def _check_table(workdir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    code, out, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once", *flags], capsys)
    assert code == 0, err
    assert "best, patience and retention by validation accuracy (higher is better); reported only: test, shifted" \
        in " ".join(out.split())
    header = out.split("model-20")[0]
    for name in ("validation", "test", "shifted", "top3%", "hits", "mean_margin"):
        assert name in header


def _check_best_select(workdir: Path, capsys: pytest.CaptureFixture[str], rows: list[Any]) -> None:
    test_rows = sorted((r for r in rows if r["split"] == "test"), key=lambda r: (-r["accuracy"], r["step"]))
    code, out, _ = run_cli(["best", "--workdir", str(workdir), "--select", "test", "--json"], capsys)
    assert code == 0 and json.loads(out)["checkpoint"] == test_rows[0]["checkpoint"]
    code, out, _ = run_cli(["best", "--workdir", str(workdir), "--select", "shifted:loss"], capsys)
    lowest = min((r for r in rows if r["split"] == "shifted"), key=lambda r: (r["loss"], r["step"]))
    assert code == 0 and out.startswith(f"best on shifted loss (lower is better): {lowest['checkpoint']} ")
    best = read_best(open_storage(workdir)) or {}
    top = max((r for r in rows if r["split"] == "validation"), key=lambda r: (r["accuracy"], -r["step"]))
    assert (best["checkpoint"], best["split"], best["metric"]) == (top["checkpoint"], "validation", "accuracy")


def test_select_a_metric_where_lower_is_better(workdir: Path, tiny_data: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rows = evaluate_json(workdir, tiny_data, capsys, "--split", "validation", "--split", "test", "--select",
                         "test:loss")
    lowest = min((r for r in rows if r["split"] == "test"), key=lambda r: (r["loss"], r["step"]))
    best = read_best(open_storage(workdir)) or {}
    assert (best["checkpoint"], best["split"], best["metric"], best["mode"]) == (lowest["checkpoint"], "test",
                                                                                 "loss", "min")
    assert best["value"] == lowest["loss"]
    # An evaluator that ranks another result leaves that best alone, and says so, even with --json.
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once", "--json"], capsys)
    assert code == 0 and (read_best(open_storage(workdir)) or {})["metric"] == "loss"
    assert "warning: eval/best ranks test loss (lower is better) and this evaluator validation accuracy" in err


def test_new_sets_go_to_new_checkpoints_unless_backfill(trained_runs: Callable[..., Path], tiny_data: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = Path(shutil.copytree(trained_runs(evaluated=True), tmp_path / "old", symlinks=True))
    before = Ledger(open_storage(workdir)).read()
    rows = evaluate_json(workdir, tiny_data, capsys, "--split", "validation", "--split", "test")
    assert Ledger(open_storage(workdir)).read() == before  # every checkpoint has its deciding result
    assert {r["split"] for r in rows} == {"validation"}
    # A checkpoint committed after the evaluator started gets every set, whoever recorded the deciding one.
    session = Session(EvalConfig(workdir=workdir, data_dir=str(tiny_data), splits=("validation", "test")))
    assert [session.needed(c) for c in session.listed()] == [(), (), ()]
    session.started = 0.0
    assert [session.needed(c) for c in session.listed()] == [("test",)] * 3
    rows = evaluate_json(workdir, tiny_data, capsys, "--split", "validation", "--split", "test", "--backfill")
    assert sorted((r["step"], r["split"], r["evaluated_here"]) for r in rows) == [
        (s, n, n == "test") for s in (20, 40, 60) for n in ("test", "validation")]
    # An evaluator of the test split alone still evaluates every checkpoint on it, as before.
    again = Path(shutil.copytree(trained_runs(evaluated=True), tmp_path / "again", symlinks=True))
    rows = evaluate_json(again, tiny_data, capsys, "--split", "test")
    assert sorted((r["step"], r["split"], r["evaluated_here"]) for r in rows) == [(s, "test", True)
                                                                                 for s in (20, 40, 60)]


def _empty_npz(tmp_path: Path) -> Path:
    images = np.zeros((4, 28, 28), np.uint8)
    np.savez(tmp_path / "empty.npz", x_train=images, y_train=np.arange(4), x_test=images[:0], y_test=np.arange(0))
    return tmp_path / "empty.npz"


def test_watch_stops_at_once_for_a_bad_metric(workdir: Path, tiny_data: Path) -> None:
    """Watch mode does not wait for a workdir that no state of it mends: exit 2 (SetError), nothing written."""
    cfg = EvalConfig(workdir=workdir, data_dir=str(tiny_data), metrics=("tests.user_metrics:raises",),
                     exit_when_done=True)
    with pytest.raises(SetError, match="raised ValueError: no metric today"):
        run_watch(cfg, Spy(), StopRequest())
    assert not (workdir / "eval").exists()


def test_plain_lines_keep_each_sets_figures_apart() -> None:
    """A set may be called `raw`: its figures are `raw.accuracy`, never the line's own `raw_accuracy`."""
    row = Row(step=20, checkpoint="model-20", status="ok", accuracy=0.5, headline="validation",
              sets={"validation": SetResult("ok", accuracy=0.5, loss=1.0, metrics={"hits": 0.5}),
                    "raw": SetResult("ok", accuracy=0.25, loss=2.0)})
    out = io.StringIO()
    PlainLines(out).update([row], {})
    assert "set=validation" in out.getvalue() and "raw.accuracy=0.25" in out.getvalue()
    assert "validation.hits=0.5" in out.getvalue()


def _bad_folder(tmp_path: Path, tiny_data: Path) -> Path:
    return image_folder(tmp_path / "zoo", tiny_data, classes={1: "Trouser", 3: "Zebra"}, per_class=2)


@pytest.mark.parametrize(("flags", "message"), [
    (["--select", "nope"], "--select nope: not an evaluated set (they are: validation)"),
    (["--select", "validation:hits", "--metric", "tests.user_metrics:hits"],
     "say whether higher or lower hits is better"),
    (["--select", "validation:top5_accuracy"], "not a computed metric"),
    (["--split", "test", "--split", "test"], "the set 'test' is named twice"),
    (["--eval-data", "shifted"], "expected NAME=REF"),
    (["--eval-data", "test=npz:/x.npz"], "not a split's name"),
    (["--eval-data", "ZOO"], "a class the model does not know: Zebra"),
    (["--eval-data", "EMPTY"], "holds no examples"),
    (["--top-k", "10"], "--top-k (10) must be below the model's 10 classes"),
    (["--metric", "tests.user_metrics:raises"], "tests.user_metrics:raises raised ValueError: no metric today"),
    (["--metric", "tests.user_metrics:per_class_shape"], "returned shape [10] for a batch of 8"),
    (["--metric", "tests.user_metrics:not_a_number"], "tests.user_metrics:not_a_number raised ValueError"),
    (["--metric", "tests.user_metrics:absent"], "has no function absent"),
    (["--patience", "2", "--split", "test"], "--patience watches the selected set"),
])
def test_bad_sets_and_metrics_exit_2_before_writing(flags: list[str], message: str, workdir: Path, tiny_data: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = [f"zoo=folder:{_bad_folder(tmp_path, tiny_data)}" if f == "ZOO" else f for f in flags]
    flags = [f"empty=npz:{_empty_npz(tmp_path)}" if f == "EMPTY" else f for f in flags]
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once", *flags], capsys)
    assert code == 2 and err.startswith("evaluator: error: ") and err.count("\n") == 1, err
    assert message in err
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def test_a_missing_set_is_no_data_exit_4(workdir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["--workdir", str(workdir), "--data-dir", str(tiny_data), "--once", "--eval-data",
                            "gone=folder:/nonexistent/images"], capsys)
    assert (code, err) == (4, "evaluator: error: folder:/nonexistent/images: no such folder\n")
    assert not (workdir / "eval").exists()


def test_metrics_reduce_exactly_over_batches_and_replicas() -> None:
    """Top-k and users' metrics: the same figures for any batch size, on one device or two replicas."""
    images, labels = _random_split(101)
    split = datasets.Split(images, labels)
    metrics = (UserMetric("tests.user_metrics:hits", _import("hits")),
               UserMetric("tests.user_metrics:mean_margin", _import("mean_margin")))
    prepare = lambda x: tf.cast(x, tf.float32) / 255.0  # noqa: E731
    model = mnist_model("softmax", seed=3)
    whole = Evaluation(model, prepare, batch_size=1000, top_k=3, metrics=metrics)(split)
    logits = model(prepare(images)).numpy()
    top3 = np.mean([label in np.argsort(-row)[:3] for row, label in zip(logits, labels, strict=True)])
    assert whole["metrics"]["top3_accuracy"] == top3
    assert whole["metrics"]["hits"] == whole["accuracy"]
    for batch_size in (7, 50):
        small = Evaluation(model, prepare, batch_size=batch_size, top_k=3, metrics=metrics)(split)
        assert small["metrics"]["top3_accuracy"] == top3 and small["metrics"]["hits"] == whole["accuracy"]
        assert small["metrics"]["mean_margin"] == pytest.approx(whole["metrics"]["mean_margin"], rel=1e-6)
    strategy = mirrored()
    with strategy.scope():
        shared = mnist_model("softmax", seed=3)
    sharded = Evaluation(shared, prepare, batch_size=7, strategy=strategy, top_k=3, metrics=metrics)(split)
    assert sharded["count"] == len(split) and sharded["metrics"]["top3_accuracy"] == top3
    assert sharded["metrics"]["hits"] == whole["accuracy"]
    assert sharded["metrics"]["mean_margin"] == pytest.approx(whole["metrics"]["mean_margin"], rel=1e-6)


def _random_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def _import(name: str) -> Any:
    from tests import user_metrics

    return getattr(user_metrics, name)
