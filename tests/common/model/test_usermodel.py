"""A user's own model (`--model module.path:function`) on a user's own data, end to end."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from common.errors import UsageError
from common.model import registry
from common.model.ema import variables_to_restore
from evaluator.serving import predict
from tests.byo_models import bar_images, write_folder, write_npz
from tests.evaluator.serving.test_export_predict import run_clean
from tests.helpers import run_evaluator_cli, run_trainer_cli

KERAS, MODULE = "tests.byo_models:keras_bn", "tests.byo_models:nested_module"
# Each data source and each model kind at least once.
RUNS = {
    "folder-keras": ("folder", KERAS),
    "folder-module": ("folder", MODULE),
    "npz-module": ("npz", MODULE),
    "function-keras": ("function", KERAS),
}


def test_keras_variables_keep_their_paths_and_batch_norm_statistics_are_not_trainable() -> None:
    model = registry.build(KERAS, num_classes=3, input_shape=(8, 8, 3))
    named = model.named_variables()
    assert list(named) == ["conv/kernel", "conv/bias", "bn/gamma", "bn/beta", "bn/moving_mean",
                           "bn/moving_variance", "logits/kernel", "logits/bias"]
    assert [k for k, v in named.items() if not v.trainable] == ["bn/moving_mean", "bn/moving_variance"]
    # The EMA restore maps the statistics to their raw keys, as TF1's variables_to_restore did.
    assert sorted(variables_to_restore(model))[:4] == ["ema/bn/beta", "ema/bn/gamma", "ema/conv/bias",
                                                       "ema/conv/kernel"]
    assert "model/bn/moving_mean" in variables_to_restore(model)
    assert model(tf.zeros([2, 8, 8, 3])).shape == (2, 3)


def test_unnamed_keras_layers_get_the_same_paths_in_every_build() -> None:
    first = registry.build("tests.byo_models:keras_sequential", num_classes=3, input_shape=(8, 8, 1))
    second = registry.build("tests.byo_models:keras_sequential", num_classes=3, input_shape=(8, 8, 1))
    assert list(first.named_variables()) == list(second.named_variables()) == [
        "sequential/dense/kernel", "sequential/dense/bias", "sequential/dense_1/kernel", "sequential/dense_1/bias"]
    assert first(tf.zeros([2, 8, 8, 1])).shape == (2, 3)  # the first model still works


def test_module_variables_three_levels_deep() -> None:
    model = registry.build(MODULE, num_classes=4, input_shape=(8, 8, 1), seed=1)
    assert list(model.named_variables()) == ["encoder/block/proj/kernel", "encoder/block/proj/bias"]
    again = registry.build(MODULE, num_classes=4, input_shape=(8, 8, 1), seed=1)
    assert np.array_equal(model.named_variables()["encoder/block/proj/kernel"].numpy(),
                          again.named_variables()["encoder/block/proj/kernel"].numpy())  # --seed sets the weights


@pytest.mark.parametrize(("reference", "message"), [
    ("tests.byo_models:raises", "the function raised RuntimeError: no model today"),
    ("tests.no_such_module:model", "cannot import tests.no_such_module (ModuleNotFoundError"),
    ("tests.byo_models:missing", "tests.byo_models has no function missing"),
    ("tests.byo_models:no_variables", "the model has no trainable variables"),
    ("tests.byo_models:wrong_outputs", "returns outputs of shape [1, 4] for one image, expected [1, 3]"),
    ("tests.byo_models:same_names", "several variables have the path twins/fc/bias"),
])
def test_bad_model_functions_are_one_line_exit_2_and_write_nothing(
        reference: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_folder(tmp_path / "pets", n_train=36, n_test=6)
    workdir = tmp_path / "run"
    code, _, err = run_trainer_cli(["--dataset", f"folder:{folder}", "--image-size", "8x8", "--model", reference,
                                    "--workdir", str(workdir)], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not workdir.exists()


def test_a_module_without_trainable_variables_is_refused() -> None:
    class Frozen(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.zeros([192, 3]), trainable=False)

        def __call__(self, x: tf.Tensor) -> tf.Tensor:
            return tf.reshape(x, [-1, 192]) @ self.w

    import tests.byo_models as user

    user.frozen = lambda num_classes, input_shape: Frozen()  # type: ignore[attr-defined]
    try:
        with pytest.raises(UsageError, match="has no trainable variables"):
            registry.build("tests.byo_models:frozen", num_classes=3, input_shape=(8, 8, 3))
    finally:
        del user.frozen  # type: ignore[attr-defined]


def _dataset(kind: str, root: Path) -> tuple[list[str], list[Path]]:
    """The trainer's data flags for `kind`, and a few image files to predict."""
    if kind == "folder":
        folder = root / "pets"
        if not folder.exists():
            write_folder(folder, n_train=120, n_test=30)
        return ["--dataset", f"folder:{folder}", "--image-size", "8x8", "--channels", "3"], \
            sorted((folder / "test" / "emu").iterdir())[:2]
    pictures = root / f"{kind}-pictures"
    pictures.mkdir(exist_ok=True)
    images, _ = bar_images(3, classes=3, size=8, seed=9)
    for i, image in enumerate(images):
        Image.fromarray(image).save(pictures / f"{i}.png")
    if kind == "npz":
        return ["--dataset", f"npz:{write_npz(root / 'd.npz')}"], sorted(pictures.iterdir())
    return ["--dataset", "tests.byo_models:make_data"], sorted(pictures.iterdir())


@pytest.fixture(scope="module")
def byo_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, list[Path]]]:
    """`byo_runs(name)`: a finished, evaluated and exported run of `RUNS[name]`, and files to predict."""
    root = tmp_path_factory.mktemp("byo")
    cache: dict[str, tuple[Path, list[Path]]] = {}

    def get(name: str) -> tuple[Path, list[Path]]:
        if name not in cache:
            from evaluator import cli as evaluator_cli
            from trainer import cli as trainer_cli

            kind, model = RUNS[name]
            flags, files = _dataset(kind, root)
            workdir = root / name
            assert trainer_cli.main([*flags, "--model", model, "--workdir", str(workdir), "--steps", "40",
                                     "--save-every", "20", "--batch-size", "16", "--progress", "plain"]) == 0
            assert evaluator_cli.main(["--workdir", str(workdir), "--once"]) == 0
            assert evaluator_cli.main(["export", "--workdir", str(workdir), "--step", "latest"]) == 0
            cache[name] = workdir, files
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(RUNS))
def test_end_to_end(name: str, byo_runs: Callable[[str], tuple[Path, list[Path]]],
                    capsys: pytest.CaptureFixture[str]) -> None:
    workdir, files = byo_runs(name)
    kind, model = RUNS[name]
    run = json.loads((workdir / "run.json").read_text())
    assert run["model"] == model and run["dataset"].startswith(kind if kind != "function" else "tests.")
    keys = {k for k, _ in tf.train.list_variables(str(workdir / "model-40"))}
    if model == KERAS:
        assert {"model/bn/moving_mean/.ATTRIBUTES/VARIABLE_VALUE", "ema/conv/kernel/.ATTRIBUTES/VARIABLE_VALUE",
                "optimizer/m/logits/kernel/.ATTRIBUTES/VARIABLE_VALUE"} <= keys
        assert not any(k.startswith("ema/bn/moving") for k in keys)
        moving = tf.train.load_checkpoint(str(workdir / "model-40")).get_tensor(
            "model/bn/moving_mean/.ATTRIBUTES/VARIABLE_VALUE")
        assert np.abs(moving).max() > 0  # the statistics moved during training and were saved
    else:
        assert {"model/encoder/block/proj/kernel/.ATTRIBUTES/VARIABLE_VALUE",
                "ema/encoder/block/proj/bias/.ATTRIBUTES/VARIABLE_VALUE"} <= keys
    # The evaluator rebuilt model and data from run.json alone: its EMA numbers for the last
    # checkpoint are the trainer's own (batch norm statistics restored with the EMA weights).
    done = json.loads((workdir / "done.json").read_text())["ema_metrics"]["validation"]
    rows = [json.loads(line) for line in (workdir / "eval" / "results.jsonl").read_text().splitlines()]
    last = next(r for r in rows if r["step"] == 40 and r["weights"] == "ema")
    assert last["status"] == "ok" and last["count"] == done["count"]
    assert last["loss"] == pytest.approx(done["loss"], rel=1e-4) and last["accuracy"] == done["accuracy"]
    assert done["accuracy"] > 0.6  # bars at three rows: learnable in 40 steps
    code, out, err = predict_files(workdir / "export" / "40", files, capsys)
    assert code == 0, err
    top = [json.loads(line)["class"] for line in out.splitlines()]
    assert len(top) == len(files) and set(top) <= set(run["class_names"])
    assert predict_files(workdir / "model-40", files, capsys)[1] == out  # the checkpoint gives the same answers


def predict_files(model: Path, files: list[Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # what came before (the fixture's programs) is not predict's
    code = predict.main(["--model", str(model), "--json", "--top-k", "1", *map(str, files)])
    out, err = capsys.readouterr()
    return code, out, err


def test_exports_load_without_the_project(byo_runs: Callable[[str], tuple[Path, list[Path]]],
                                          tmp_path: Path) -> None:
    exports = [str(byo_runs(name)[0] / "export" / "40") for name in RUNS]
    got = json.loads(run_clean(f"""
import json
out = []
for path in {exports!r}:
    serve = tf.saved_model.load(path).signatures["serving_default"]
    spec = serve.structured_input_signature[1]["images"]
    result = serve(images=tf.zeros([2, *spec.shape[1:]], spec.dtype))
    out.append([spec.shape.as_list(), result["probabilities"].shape.as_list(),
                [n.decode() for n in result["class_names"].numpy()]])
print(json.dumps(out))
""", tmp_path).splitlines()[-1])
    shapes = {name: (inputs, probs) for name, (inputs, probs, _) in zip(RUNS, got, strict=True)}
    assert shapes["folder-keras"] == ([None, 8, 8, 3], [2, 3])
    assert shapes["npz-module"] == ([None, 8, 8], [2, 4])
    assert shapes["function-keras"] == ([None, 8, 8], [2, 3])
    assert set(got[0][2]) <= {"cat", "dog", "emu"} and set(got[3][2]) <= {"low", "mid", "high"}


def test_resume_from_the_workdir_alone(byo_runs: Callable[[str], tuple[Path, list[Path]]], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    workdir = Path(shutil.copytree(byo_runs("folder-keras")[0], tmp_path / "run"))
    code, out, err = run_trainer_cli(["--workdir", str(workdir), "--steps", "60", "--progress", "plain"], capsys)
    assert code == 0, err
    assert "resumed from model-40 (step 40)" in out and (workdir / "model-60.index").exists()
    code, _, err = run_trainer_cli(["--workdir", str(workdir), "--steps", "80", "--image-size", "16x16"], capsys)
    assert code == 2 and "disagrees with the flags given (input_spec" in err
    code, _, err = run_evaluator_cli(["--workdir", str(workdir), "--once"], capsys)
    assert code == 0, err


def test_warm_start_from_a_user_model_run(byo_runs: Callable[[str], tuple[Path, list[Path]]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    source = byo_runs("folder-keras")[0]
    dataset = json.loads((source / "run.json").read_text())["dataset"]
    code, out, err = run_trainer_cli(["--workdir", str(tmp_path / "warm"), "--dataset", dataset, "--image-size", "8x8",
                                      "--model", KERAS, "--steps", "20", "--batch-size", "16", "--init-from",
                                      str(source), "--init-weights", "raw", "--progress", "plain"], capsys)
    assert code == 0, err
    # With the raw weights the batch norm statistics come too.
    assert "model/bn/moving_mean" in out and "restored from model/bn/moving_mean" in out, out


def test_a_workdir_from_before_resumes_evaluates_and_exports(trained_runs: Callable[..., Path], tiny_data: Path,
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    workdir = Path(shutil.copytree(trained_runs(), tmp_path / "old", symlinks=True))
    run = json.loads((workdir / "run.json").read_text())
    old_fields = ("dataset", "model", "batch_size", "lr", "lr_decay_rate", "lr_decay_steps", "l2", "ema_decay",
                  "seed", "class_names", "classes", "train_examples", "version", "created")
    (workdir / "run.json").write_text(json.dumps({k: run[k] for k in old_fields}))
    data = ["--data-dir", str(tiny_data)]
    code, out, err = run_trainer_cli(["--workdir", str(workdir), "--steps", "80", "--progress", "plain", *data],
                                     capsys)
    assert code == 0 and "resumed from model-60 (step 60)" in out, err
    code, _, err = run_evaluator_cli(["--workdir", str(workdir), "--once", *data], capsys)
    assert code == 0, err
    code, _, err = run_evaluator_cli(["export", "--workdir", str(workdir), "--step", "latest"], capsys)
    assert code == 0 and (workdir / "export" / "80" / "saved_model.pb").is_file(), err


def test_float_arrays_train_but_image_files_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = bar_images(120, classes=3, size=8, seed=1)
    path = tmp_path / "floats.npz"
    np.savez(path, x_train=x / 255.0, y_train=y, x_test=x[:30] / 255.0, y_test=y[:30])
    workdir = tmp_path / "run"
    code, _, err = run_trainer_cli(["--dataset", f"npz:{path}", "--model", MODULE, "--workdir", str(workdir),
                                    "--steps", "10", "--save-every", "10", "--batch-size", "16"], capsys)
    assert code == 0, err
    run = json.loads((workdir / "run.json").read_text())
    assert run["input_spec"]["dtype"] == "float32" and run["preprocessing"]["scale"] == 1.0
    picture = tmp_path / "a.png"
    Image.fromarray(x[0]).save(picture)
    code, _, err = predict_files(workdir, [picture], capsys)
    assert code == 2 and "8x8x1 float32 arrays" in err and err.count("\n") == 1
