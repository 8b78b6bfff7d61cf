"""Export (SavedModel, frozen graph) and `predict` on image files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from common.checkpoint import checkpoints
from common.data import datasets
from common.model.ema import variables_to_restore
from common.run.workdir import Workdir
from evaluator import cli
from evaluator.serving import export as export_lib
from evaluator.serving import predict
from evaluator.serving.images import preprocess, read_gray
from tests.helpers import REPO, Recorder, make_train_config, mnist_model
from trainer.loop import train

# Run in a subprocess: refuse any import of this project, then use only TensorFlow.
NO_PROJECT = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("common", "trainer", "evaluator", "tests"):
            raise ImportError("the export must not need " + name)
sys.meta_path.insert(0, Refuse())
import numpy as np, tensorflow as tf
"""


@pytest.fixture
def trained(trained_runs: Callable[..., Path]) -> Path:
    return trained_runs("mlp", evaluated=True)


def ema_probabilities(workdir: Path, step: int, images: np.ndarray) -> np.ndarray:
    model = mnist_model("mlp")
    checkpoints.restore_variables(workdir / f"model-{step}", variables_to_restore(model))
    return tf.nn.softmax(model(tf.cast(images, tf.float32) / 255.0)).numpy()


def run_clean(code: str, tmp_path: Path) -> str:
    done = subprocess.run([sys.executable, "-c", NO_PROJECT + code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def clean_probabilities(export: Path, images: np.ndarray, tmp_path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Probabilities of an export's SavedModel and frozen graph, loaded where this project cannot be imported.

    Also returns the SavedModel's class name for the first image.
    """
    np.save(tmp_path / "images.npy", images)
    name = run_clean(f"""
m = tf.saved_model.load({str(export)!r})
x = np.load("images.npy")
r = m.signatures["serving_default"](images=tf.constant(x))
np.save("saved.npy", r["probabilities"].numpy())
print(r["class_names"].numpy()[0].decode())
gd = tf.compat.v1.GraphDef()
gd.ParseFromString(open({str(export / 'frozen_graph.pb')!r}, "rb").read())
g = tf.Graph()
with g.as_default():
    tf.compat.v1.import_graph_def(gd, name="")
with tf.compat.v1.Session(graph=g) as s:
    np.save("frozen.npy", s.run("probabilities:0", {{"images:0": x}}))
""", tmp_path)
    return np.load(tmp_path / "saved.npy"), np.load(tmp_path / "frozen.npy"), name.strip()


def test_export_loads_without_the_project(workdir: Path, tiny_data: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", "--workdir", str(workdir), "--step", "40", "--frozen"]) == 0
    out = workdir / "export" / "40"
    printed = capsys.readouterr().out
    assert f"{out / 'frozen_graph.pb'} (input images:0, outputs probabilities:0, classes:0)" in printed
    images = datasets.load("fashion-mnist", str(tiny_data)).test.images[:16]
    expected = ema_probabilities(workdir, 40, images)
    saved, frozen, got = clean_probabilities(out, images, tmp_path)
    np.testing.assert_allclose(saved, expected, atol=1e-5)
    np.testing.assert_allclose(frozen, expected, atol=1e-5)
    names = datasets.DATASETS["fashion-mnist"].class_names
    assert got == names[int(np.argmax(expected[0]))]
    assert (out / "labels.txt").read_text().splitlines() == list(names)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_bytes_signature_matches_images(workdir: Path, tiny_data: Path) -> None:
    out = export_lib.export(Workdir.open(workdir), step="latest")
    images = datasets.load("fashion-mnist", str(tiny_data)).test.images[:4]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    loaded = tf.saved_model.load(str(out))
    by_bytes = loaded.signatures["predict_image_bytes"](image_bytes=tf.constant(encoded))["probabilities"]
    by_images = loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"]
    np.testing.assert_allclose(by_bytes.numpy(), by_images.numpy(), atol=1e-5)


def test_saved_model_cli_reads_it(workdir: Path) -> None:
    out = export_lib.export(Workdir.open(workdir), step="best")
    cli_path = Path(sys.executable).with_name("saved_model_cli")
    done = subprocess.run([str(cli_path), "show", "--all", "--dir", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1000:]
    for text in ("signature_def['serving_default']", "signature_def['predict_image_bytes']", "outputs['probabilities']",
                 "inputs['images']", "dtype: DT_UINT8"):
        assert text in done.stdout


def test_export_is_atomic(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = export_lib.export(Workdir.open(workdir), step="40")
    before = sorted(p.name for p in first.iterdir())

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("disk trouble halfway")

    monkeypatch.setattr(export_lib.tf.saved_model, "save", broken)
    with pytest.raises(RuntimeError):
        export_lib.export(Workdir.open(workdir), step="40")
    assert sorted(p.name for p in first.iterdir()) == before  # the old export is untouched
    assert [p.name for p in first.parent.iterdir()] == ["40"]  # no half-written folder left


@pytest.mark.parametrize(("flags", "message"), [
    (["--step", "30"], "model-30: cannot be exported (model-30.index is missing)"),
    (["--step", "soon"], "--step ('soon') must be a step number, 'best' or 'latest'"),
])
def test_export_bad_input(flags: list[str], message: str, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", "--workdir", str(workdir), *flags]) == 2
    assert message in capsys.readouterr().err


def save_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def test_preprocess_undoes_inversion_offset_and_scale() -> None:
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255  # a bar, light on dark, like MNIST
    reference = preprocess(digit / 255.0, datasets.MNIST_INPUT, "mnist")
    photo = np.full((200, 300), 255, np.uint8)  # dark on light, off-centre, larger
    photo[20:140, 30:60] = 0
    prepared = preprocess(photo / 255.0, datasets.MNIST_INPUT, "mnist")
    assert prepared.shape == (28, 28) and prepared.dtype == np.uint8
    assert np.abs(prepared.astype(int) - reference.astype(int)).mean() < 20
    ys, xs = np.nonzero(prepared > 128)
    assert abs(ys.mean() - 13.5) < 1 and abs(xs.mean() - 13.5) < 1
    assert ys.max() - ys.min() + 1 == 20  # fitted into 20x20, as MNIST


def test_predict_lines_json_folders_and_bad_files(workdir: Path, tiny_data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = datasets.load("fashion-mnist", str(tiny_data)).test.images
    for i in range(3):
        save_png(folder / f"ok{i}.png", images[i])
    (folder / "notes.txt").write_text("not looked at: wrong extension")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.png").write_text("hello")
    full = io.BytesIO()
    Image.fromarray(images[0]).save(full, format="PNG")
    (bad / "truncated.png").write_bytes(full.getvalue()[:60])
    save_png(bad / "huge.png", np.zeros((300, 300)))
    monkeypatch.setattr("evaluator.serving.images.MAX_PIXELS", 50_000)  # 90,000 pixels is now a "bomb"
    args = ["--model", str(workdir), "--top-k", "2", str(folder), str(bad / "text.png"), str(bad / "truncated.png"),
            str(bad / "huge.png"), str(bad / "missing.png")]
    assert predict.main(args) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{folder / 'ok0.png'}: ") and lines[0].count("%") == 2
    errors = err.splitlines()
    assert len(errors) == 4 and all(e.startswith("predict: error: ") for e in errors)
    assert "text.png: not an image" in errors[0] and "truncated.png: damaged image" in errors[1]
    assert "huge.png: image too large" in errors[2] and "missing.png: no such file" in errors[3]
    assert predict.main(["--model", str(workdir), "--json", str(folder)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["file"]).name for r in rows] == ["ok0.png", "ok1.png", "ok2.png"]
    top = [t["probability"] for t in rows[0]["top"]]
    assert len(top) == 3 and top == sorted(top, reverse=True) and 0 < sum(top) <= 1 + 1e-6


def test_predict_sources_agree(workdir: Path, tiny_data: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    image = save_png(tmp_path / "x.png", datasets.load("fashion-mnist", str(tiny_data)).test.images[5])
    best = json.loads((workdir / "eval" / "best.json").read_text())
    out = export_lib.export(Workdir.open(workdir), step="best")
    results = []
    for model in (workdir, out, workdir / best["checkpoint"]):
        assert predict.main(["--model", str(model), "--json", "--no-preprocess", str(image)]) == 0
        results.append(json.loads(capsys.readouterr().out)["top"][0])
    assert results[0]["class"] == results[1]["class"] == results[2]["class"]
    assert results[0]["probability"] == pytest.approx(results[1]["probability"], abs=1e-5)


def test_predict_refuses_an_unexpected_signature(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = tf.Module()
    module.f = tf.function(lambda x: {"y": x * 2.0}, input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / "other"), signatures={"serving_default": module.f})
    save_png(tmp_path / "a.png", np.zeros((28, 28)))
    assert predict.main(["--model", str(tmp_path / "other"), str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "unexpected serving signature (inputs ['x'], outputs ['y'])" in err and err.count("\n") == 1


def build_foreign_graph(path: Path, *, string_input: bool) -> None:
    """A tiny classifier of 'bright' vs 'dark' images, frozen like Inception's graph."""
    graph = tf.Graph()
    with graph.as_default():
        if string_input:
            contents = tf.compat.v1.placeholder(tf.string, [], name="DecodeJpeg/contents")
            image = tf.cast(tf.image.decode_png(contents, channels=1), tf.float32) / 255.0
        else:
            image = tf.compat.v1.placeholder(tf.float32, [1, 8, 8, 1], name="input")
        brightness = tf.reduce_mean(image)
        logits = tf.stack([10.0 * (brightness - 0.5), 10.0 * (0.5 - brightness)])
        tf.nn.softmax(tf.reshape(logits, [1, 2]), name="softmax")
    path.write_bytes(graph.as_graph_def().SerializeToString())


@pytest.mark.parametrize("string_input", [True, False])
def test_foreign_graph_with_label_files(string_input: bool, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    build_foreign_graph(tmp_path / "g.pb", string_input=string_input)
    save_png(tmp_path / "white.png", np.full((8, 8), 250))
    save_png(tmp_path / "black.png", np.full((8, 8), 5))
    (tmp_path / "labels.txt").write_text("bright\ndark\n")
    name = "DecodeJpeg/contents:0" if string_input else "input"
    base = ["--graph", str(tmp_path / "g.pb"), "--input", name, "--output", "softmax:0"]
    assert predict.main([*base, "--labels", str(tmp_path / "labels.txt"), "--top-k", "1",
                         str(tmp_path / "white.png"), str(tmp_path / "black.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("white.png: bright 100.0%") and lines[1].endswith("black.png: dark 100.0%")
    # Inception's pair of files: target class -> synset, synset -> human label.
    (tmp_path / "map.pbtxt").write_text('entry {\n  target_class: 0\n  target_class_string: "n001"\n}\n'
                                        'entry {\n  target_class: 1\n  target_class_string: "n002"\n}\n')
    (tmp_path / "human.txt").write_text("n001\tvery bright thing\nn002\tvery dark thing\n")
    assert predict.main([*base, "--synsets", str(tmp_path / "map.pbtxt"), "--human-labels",
                         str(tmp_path / "human.txt"), "--top-k", "1", str(tmp_path / "black.png")]) == 0
    assert capsys.readouterr().out.strip().endswith("black.png: very dark thing 100.0%")


def test_foreign_graph_bad_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_foreign_graph(tmp_path / "g.pb", string_input=False)
    save_png(tmp_path / "a.png", np.zeros((8, 8)))
    assert predict.main(["--graph", str(tmp_path / "g.pb"), "--input", "nope", "--output", "softmax",
                         str(tmp_path / "a.png")]) == 2
    assert "nope:0" in capsys.readouterr().err
    (tmp_path / "junk.pb").write_bytes(b"\xff\x00junk")
    assert predict.main(["--graph", str(tmp_path / "junk.pb"), "--input", "a", "--output", "b",
                         str(tmp_path / "a.png")]) == 2
    assert "not a GraphDef" in capsys.readouterr().err


@pytest.mark.realdata
def test_predict_recovers_real_test_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A short CNN run; PNGs of test images as they are, inverted, off-centre and enlarged."""
    try:
        test = datasets.load("fashion-mnist", download=False).test
    except Exception as e:
        pytest.skip(f"real Fashion-MNIST not available ({e})")
    cfg = make_train_config(None, tmp_path / "run", model="cnn", batch_size=64, steps=600, save_every=600,  # type: ignore[arg-type]
                            data_dir=None, ema_decay=0.99)
    result = train(cfg, reporter=Recorder())
    folder = tmp_path / "imgs"
    folder.mkdir()
    truth = {}
    for i in range(40):
        image, label = test.images[i], int(test.labels[i])
        variants = {
            "plain": image,
            "inverted": 255 - image,
            "offcentre": np.pad(image, ((5, 40), (50, 3))),
            "large": np.asarray(Image.fromarray(image).resize((90, 90), Image.Resampling.BICUBIC)),
        }
        for kind, pixels in variants.items():
            truth[save_png(folder / f"{i:02d}-{kind}.png", pixels).name] = label
    assert predict.main(["--model", str(cfg.workdir), "--json", str(folder)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = datasets.DATASETS["fashion-mnist"].class_names
    by_kind: dict[str, list[bool]] = {}
    for row in rows:
        name = Path(row["file"]).name
        by_kind.setdefault(name.split("-")[1][:-4], []).append(row["class"] == names[truth[name]])
    rates = {kind: float(np.mean(hits)) for kind, hits in by_kind.items()}
    print("recovery rates", rates, "model test accuracy", result.metrics["test"]["accuracy"])
    # The model itself scores result.metrics["test"]["accuracy"] (about 85% here); each variant must
    # come within 15 points of the plain images.
    assert rates["plain"] >= 0.7, rates
    for kind in ("inverted", "offcentre", "large"):
        assert rates[kind] >= rates["plain"] - 0.15, rates
    assert result.metrics["test"]["accuracy"] > 0.7
    assert read_gray(folder / "00-plain.png").shape == (28, 28)


def test_predict_prints_one_line_per_failed_file_and_nothing_of_tensorflow(workdir: Path, tiny_data: Path,
                                                                           tmp_path: Path) -> None:
    # A process of its own: TensorFlow logs its cuInit failure (the GPU build, no GPU) once per process.
    good = save_png(tmp_path / "ok.png", datasets.load("fashion-mnist", str(tiny_data)).test.images[0])
    (tmp_path / "bad.png").write_text("hello")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user runs it
    done = subprocess.run([sys.executable, "-m", "evaluator.serving.predict", "--model", str(workdir), str(good),
                           str(tmp_path / "bad.png")], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 1 and done.stdout.startswith(f"{good}: ")
    errors = done.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"predict: error: {tmp_path / 'bad.png'}: not an image"), errors
