"""Watching TF1 `tf.train.Saver` runs: the checkpoint's own meta graph, its moving averages, no model code.

The trainer and the reference evaluation are the tutorials' (tests/tf1_tutorial.py); the evaluator
must give, for every checkpoint, exactly the numbers the tutorial's mnist_eval.py logic gives.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import State
from common.checkpoint.tf1graph import GraphFlagError, GraphFlags, SaverGraph, meta_of
from common.run.ledger import Ledger
from common.run.workdir import Workdir
from common.signals import StopRequest
from common.storage import open_storage
from evaluator.config import EvalConfig
from evaluator.loop import run_once, run_watch
from evaluator.sets import EvalSet
from evaluator.tf1core import GraphEvaluator
from tests import tf1_tutorial
from tests.evaluator.serving.test_export_predict import clean_probabilities
from tests.helpers import Spy, Watched, checkpoint_files, listing, run_evaluator_cli, watch_reference_loop

GRAPH = GraphFlags(input="x-input:0", output="layer2/add:0", dataset="mnist")
FLAGS = ["--tf1-graph", "--input", GRAPH.input, "--output", GRAPH.output, "--dataset", "mnist"]
STEPS, SAVE_EVERY = 120, 10  # 12 saves; the Saver's max_to_keep=5 deletes the 7 oldest
LAST = f"{tf1_tutorial.MODEL_NAME}-{STEPS}"


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Watched:
    """A tutorial TF1 trainer run in a subprocess while the evaluator's watch loop (--weights both) runs here."""
    root = tmp_path_factory.mktemp("tf1")
    args = [str(root / "run"), str(root / "data"), str(root / "refs.jsonl"), str(root / "validation.npz"),
            "--steps", str(STEPS), "--save-every", str(SAVE_EVERY)]
    return watch_reference_loop(root, "tests.tf1_tutorial", args, last=LAST, graph=GRAPH)


def copy_of(watched: Watched, tmp_path: Path, *, ledger: bool = True) -> Path:
    """A copy of the watched run, its state file naming the copy's files as a Saver writing there would."""
    workdir = Path(shutil.copytree(watched.workdir, tmp_path / "run", symlinks=True))
    state = checkpoints.read_state(open_storage(workdir))
    assert state is not None
    checkpoints.write_state(open_storage(workdir), State(latest=str(workdir / Path(state.latest or "").name),
                                           paths=[str(workdir / Path(p).name) for p in state.paths]))
    if not ledger:
        shutil.rmtree(workdir / "eval")
    return workdir


def ok_rows(workdir: Path, weights: str = "ema") -> list[dict[str, Any]]:
    return [r for r in Ledger(open_storage(workdir)).read() if r["status"] == "ok" and r["weights"] == weights]


def test_every_checkpoint_matches_the_tutorial_evaluation(watched: Watched) -> None:
    records = Ledger(open_storage(watched.workdir)).read()
    assert {r["status"] for r in records} <= {"ok", "gone"}, [r.get("reason") for r in records]
    ema, raw = ok_rows(watched.workdir), {r["checkpoint"]: r for r in ok_rows(watched.workdir, "raw")}
    assert LAST in {r["checkpoint"] for r in ema} and len(ema) == len(raw)
    for row in ema:
        ref = watched.refs[row["checkpoint"]]
        assert row["step"] == checkpoints.saver_step(row["checkpoint"]) and row["examples"] == len(watched.validation)
        assert row["accuracy"] == pytest.approx(ref["ema"], abs=1e-6)
        assert raw[row["checkpoint"]]["accuracy"] == pytest.approx(ref["raw"], abs=1e-6)
    # The moving averages lag behind early on: the two differ, so the match above tells them apart.
    assert any(abs(watched.refs[r["checkpoint"]]["ema"] - watched.refs[r["checkpoint"]]["raw"]) > 1e-6
               for r in ema)
    state = checkpoints.read_state(open_storage(watched.workdir))
    assert state is not None and len(state.paths) == 5 and all(Path(p).is_absolute() for p in state.paths)
    # Evaluated, then deleted by the Saver's max_to_keep=5: the rows stay, and eval/best keeps its own files.
    deleted = [r["checkpoint"] for r in ema if not (watched.workdir / f"{r['checkpoint']}.index").exists()]
    assert deleted and len(ema) > 5


def test_snapshot_holds_while_the_saver_deletes(watched: Watched, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = copy_of(watched, tmp_path, ledger=False)
    name = LAST
    real = SaverGraph.restore
    deleted = []

    def delete_then_restore(self: SaverGraph, prefix: Path, weights: str) -> None:
        for file in checkpoint_files(workdir / name):  # what max_to_keep does to the oldest checkpoint
            file.unlink()
            deleted.append(file.name)
        real(self, prefix, weights)

    monkeypatch.setattr(SaverGraph, "restore", delete_then_restore)
    opened = Workdir.open(workdir)
    core = GraphEvaluator(opened, GRAPH, (EvalSet("validation", watched.validation),), weights="ema")
    try:  # as the session does: pin, then evaluate the private copy
        base = core.begin(str(workdir / name), committed=0.0, detected=0.0, fingerprint=None)
        with opened.pin(name) as private:
            [record] = core.evaluate_snapshot(private, base)
    finally:
        core.close()
    assert sorted(deleted) == sorted([f"{name}.data-00000-of-00001", f"{name}.index", f"{name}.meta"])
    assert record.status == "ok" and record.accuracy == pytest.approx(watched.refs[name]["ema"], abs=1e-6)


def test_best_keeps_the_meta_and_report_and_best_work(watched: Watched, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    workdir = copy_of(watched, tmp_path)
    ema = ok_rows(workdir)
    best = max(ema, key=lambda r: r["accuracy"])  # max keeps the first of equals: ties keep the earlier step
    entry = json.loads((workdir / "eval" / "best.json").read_text())
    assert entry["checkpoint"] == best["checkpoint"] and entry["weights"] == "ema"
    kept = {p.name for p in (workdir / "eval" / "best").iterdir()}
    assert {f"{best['checkpoint']}.meta", f"{best['checkpoint']}.index", "checkpoint"} <= kept
    code, out, _ = run_evaluator_cli(["best", "--workdir", str(workdir)], capsys)
    assert code == 0 and best["checkpoint"] in out
    code, out, err = run_evaluator_cli(["report", "--workdir", str(workdir), *FLAGS, "--data-dir", str(watched.data)],
                                       capsys)
    assert code == 0, err
    report = workdir / "eval" / f"report-{best['step']}"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(best["accuracy"], abs=1e-6)
    assert np.sum(metrics["confusion"]) == len(watched.validation)
    assert (report / "misclassified.png").stat().st_size > 0 and (report / "confusion.txt").is_file()
    code, _, err = run_evaluator_cli(["report", "--workdir", str(workdir), *FLAGS, "--data-dir", str(watched.data),
                                      "--step", str(SAVE_EVERY)], capsys)  # evaluated, then deleted by the Saver
    assert code == 2 and f"step {SAVE_EVERY} is no longer on disk" in err and err.count("\n") == 1


def test_frozen_export_gives_the_evaluators_probabilities(watched: Watched, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    workdir = copy_of(watched, tmp_path)
    code, out, err = run_evaluator_cli(["export", "--workdir", str(workdir), *FLAGS[:5], "--step", "latest",
                                        "--frozen"], capsys)
    assert code == 0, err
    export = workdir / "export" / str(STEPS)
    assert f"frozen graph: {export / 'frozen_graph.pb'} (input images:0, outputs probabilities:0, classes:0)" in out
    images = watched.validation.images[:20]
    graph = SaverGraph(meta_of(workdir / LAST), GRAPH)
    try:
        graph.restore(workdir / LAST, "ema")
        expected = graph.probabilities(graph.outputs(images))
    finally:
        graph.close()
    reference = tf1_tutorial.evaluate(str(workdir / LAST), images, watched.validation.labels[:20])["probabilities"]
    np.testing.assert_allclose(expected, reference, atol=1e-6)
    saved, frozen, name = clean_probabilities(export, images, tmp_path)
    np.testing.assert_allclose(frozen, expected, atol=1e-5)
    np.testing.assert_allclose(saved, expected, atol=1e-5)
    assert name == str(np.argmax(expected[0]))
    _predict_both_ways(export, images[0], int(np.argmax(expected[0])), tmp_path, capsys)


def _predict_both_ways(export: Path, image: np.ndarray, expected: int, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    """`predict --model` (the SavedModel) and `predict --graph` (the frozen graph) pick the evaluator's class."""
    from evaluator.serving import predict

    picture = tmp_path / "digit.png"
    Image.fromarray(image).save(picture)
    for source in (["--model", str(export), "--no-preprocess"],
                   ["--graph", str(export / "frozen_graph.pb"), "--input", "images:0", "--output", "probabilities:0",
                    "--labels", str(export / "labels.txt")]):
        assert predict.main([*source, "--json", str(picture)]) == 0
        assert json.loads(capsys.readouterr().out)["class"] == str(expected), source


@pytest.mark.parametrize(("flags", "message"), [
    (["--input", "x-inpt:0"], "--input x-inpt:0: no such tensor in the graph of mnist_classify.ckpt-120.meta "
                              "(closest: x-input:0"),
    (["--input", "Relu:0"], "it cannot take 28x28x1 images"),
    (["--output", "Relu:0"], "--output Relu:0 has shape (None, 30)"),
])
def test_flags_that_do_not_fit_the_graph(watched: Watched, tmp_path: Path, flags: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    workdir = copy_of(watched, tmp_path, ledger=False)
    before = listing(workdir)
    args = {**dict(zip(FLAGS[1::2], FLAGS[2::2], strict=True)), **dict(zip(flags[::2], flags[1::2], strict=True))}
    cli = [x for pair in args.items() for x in pair]
    code, _, err = run_evaluator_cli(["--workdir", str(workdir), "--tf1-graph", *cli, "--data-dir",
                                      str(watched.data), "--once"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert listing(workdir) == before


def test_watch_mode_stops_on_flags_that_cannot_fit(watched: Watched, tmp_path: Path) -> None:
    workdir = copy_of(watched, tmp_path, ledger=False)
    cfg = EvalConfig(workdir=workdir, data_dir=str(watched.data), graph=dataclasses.replace(GRAPH, output="Relu:0"))
    with pytest.raises(GraphFlagError, match="--output Relu:0 has shape"):
        run_watch(cfg, Spy(), StopRequest())  # no waiting for a later checkpoint to make them right
    assert not (workdir / "eval" / "results.jsonl").exists()


def test_the_wrong_kind_of_workdir_is_refused(watched: Watched, trained: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_evaluator_cli(["--workdir", str(trained), *FLAGS, "--data-dir", str(watched.data), "--once"],
                                     capsys)
    assert code == 2 and "TF2 object-based checkpoint" in err and err.count("\n") == 1
    code, _, err = run_evaluator_cli(["--workdir", str(watched.workdir), "--once"], capsys)
    assert code == 2 and "TF1 tf.train.Saver checkpoint" in err and "--tf1-graph" in err and err.count("\n") == 1
    code, _, err = run_evaluator_cli(["--workdir", str(watched.workdir), "--input", "x-input:0", "--once"], capsys)
    assert code == 2 and "--input go with --tf1-graph" in err


def test_missing_moving_averages_are_an_error_not_raw_weights(watched: Watched, tmp_path: Path) -> None:
    workdir = tmp_path / "no-ema"
    tf1_tutorial.train(workdir, watched.data, steps=20, save_every=10, ema=False)
    records = run_once(EvalConfig(workdir=workdir, data_dir=str(watched.data), graph=GRAPH)).ledger.read()
    assert len(records) == 2 and all(r["status"] == "error" for r in records)
    assert "no moving averages layer1/biases/ExponentialMovingAverage, layer1/weights/ExponentialMovingAverage" \
           in records[0]["reason"]
    raw = run_once(EvalConfig(workdir=workdir, data_dir=str(watched.data), graph=GRAPH, weights="raw"))
    assert [r["status"] for r in raw.ledger.read() if r["weights"] == "raw"] == ["ok", "ok"]


def test_a_moved_workdir_is_read_by_file_name(watched: Watched, tmp_path: Path) -> None:
    workdir = copy_of(watched, tmp_path, ledger=False)
    state = checkpoints.read_state(open_storage(workdir))
    assert state is not None
    gone = tmp_path / "old-place"  # where the Saver wrote them: nothing is there any more
    moved = State(latest=str(gone / Path(state.latest or "").name), paths=[str(gone / Path(p).name)
                                                                          for p in state.paths])
    checkpoints.write_state(open_storage(workdir), moved)
    session = run_once(EvalConfig(workdir=workdir, data_dir=str(watched.data), graph=GRAPH))
    assert [r["status"] for r in session.ledger.read()] == ["ok"] * 5
    # A path to a checkpoint somewhere else stays refused, even when the workdir has one of that name.
    elsewhere = copy_of(watched, tmp_path / "second", ledger=False)
    checkpoints.write_state(open_storage(workdir), State(latest=str(elsewhere / LAST), paths=[str(elsewhere / LAST)]))
    shutil.rmtree(workdir / "eval")
    records = run_once(EvalConfig(workdir=workdir, data_dir=str(watched.data), graph=GRAPH)).ledger.read()
    assert [r["status"] for r in records] == ["error"] and "points outside the workdir" in records[0]["reason"]


def test_a_step_that_disagrees_with_global_step_is_an_error(watched: Watched, tmp_path: Path) -> None:
    workdir = copy_of(watched, tmp_path, ledger=False)
    for file in checkpoint_files(workdir / LAST):
        file.rename(workdir / file.name.replace(LAST, f"{LAST}5"))
    checkpoints.write_state(open_storage(workdir), State(latest=f"{LAST}5", paths=[f"{LAST}5"]))
    [record] = run_once(EvalConfig(workdir=workdir, data_dir=str(watched.data), graph=GRAPH)).ledger.read()
    assert record["status"] == "error" and f"the name says step {STEPS}5 but its global_step is {STEPS}" \
           in record["reason"]


def test_patience_says_a_foreign_trainer_will_not_read_the_request(watched: Watched, tmp_path: Path) -> None:
    workdir = copy_of(watched, tmp_path, ledger=False)
    session = run_once(EvalConfig(workdir=workdir, data_dir=str(watched.data), graph=GRAPH, patience=1))
    assert (workdir / "stop_request.json").is_file()
    assert sum("does not read it" in note for note in session.notes) == 1


def test_help_and_flags_need_no_workdir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_evaluator_cli(["--workdir", str(tmp_path), "--tf1-graph", "--input", "x:0", "--once"], capsys)
    assert code == 2 and "--tf1-graph needs --output, --dataset" in err


def _saver_checkpoint(workdir: Path, input_shape: list[int | None]) -> tuple[np.ndarray, np.ndarray]:
    """A one-layer Saver checkpoint whose input has `input_shape`; return its EMA weights and bias."""
    import tensorflow as tf

    v1 = tf.compat.v1
    workdir.mkdir()
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, input_shape, name="x-input")
        with v1.variable_scope("layer2"):
            w = v1.get_variable("weights", [784, 10], initializer=v1.random_normal_initializer(seed=1))
            b = v1.get_variable("biases", [10], initializer=v1.random_normal_initializer(seed=2))
            tf.add(tf.matmul(tf.reshape(x, [-1, 784]), w), b, name="add")
        step = tf.Variable(7, trainable=False, name="global_step")
        ema = v1.train.ExponentialMovingAverage(0.5)
        apply = ema.apply([w, b])
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(apply)
            sess.run([w.assign(w * 2.0), b.assign(b - 1.0)])  # the raw weights move away from their shadows
            v1.train.Saver().save(sess, str(workdir / "model.ckpt"), global_step=step)
            return sess.run([ema.average(w), ema.average(b)])


@pytest.mark.parametrize("input_shape", [[None, 28, 28, 1], [7, 784]])
def test_images_take_the_shape_of_the_input(watched: Watched, tmp_path: Path, input_shape: list[int | None]) -> None:
    """Channels-last images, and a fixed batch size of 7 (the last batch padded): checked against numpy."""
    weights, bias = _saver_checkpoint(tmp_path / "run", input_shape)
    [record] = run_once(EvalConfig(workdir=tmp_path / "run", data_dir=str(watched.data), graph=GRAPH)).ledger.read()
    images = watched.validation.images.reshape(-1, 784).astype(np.float64) / 255.0
    expected = np.mean(np.argmax(images @ weights + bias, axis=1) == watched.validation.labels)
    assert record["status"] == "ok" and record["step"] == 7
    assert record["accuracy"] == pytest.approx(expected, abs=1e-6)
