"""A user's own data: `folder:PATH`, `npz:PATH` and `module.path:function` datasets (common.data.userdata)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.data import datasets, userdata
from common.data.inputspec import InputSpec, Preprocessing
from common.errors import DataFormatError, DataNotFoundError, UsageError
from common.run.spec import RunSpec
from tests.byo_models import CLASSES, write_folder, write_npz
from tests.helpers import run_trainer_cli


def test_folder_gives_sorted_classes_resized_images_and_held_out_validation(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "pets")
    spec = InputSpec(height=8, width=6, channels=3)
    data, warnings = userdata.load(f"folder:{root}", spec)
    assert warnings == []
    assert data.info.class_names == CLASSES
    assert data.train.images.shape[1:] == (8, 6, 3) and data.train.images.dtype == np.uint8
    assert (len(data.train), len(data.validation), len(data.test)) == (110, 10, 30)
    # The held-out images are a seeded choice: the same on every load, and disjoint from train.
    again, _ = userdata.load(f"folder:{root}", spec)
    assert np.array_equal(again.validation.images, data.validation.images)
    assert datasets.fingerprint(again) == datasets.fingerprint(data)
    grey, _ = userdata.load(f"folder:{root}", InputSpec(height=8, width=8, channels=1))
    assert grey.train.images.shape[1:] == (8, 8)


def test_folder_without_test_holds_out_both_and_uses_train_subfolder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_folder(root / "train", test=False)
    write_folder(root / "validation", n_train=30, test=False)
    data, _ = userdata.load(f"folder:{root}", InputSpec(height=8, width=8, channels=3))
    assert (len(data.train), len(data.validation), len(data.test)) == (110, 30, 10)


def test_undecodable_image_is_named_in_a_warning_and_skipped(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "pets")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    data, warnings = userdata.load(f"folder:{root}", InputSpec(height=8, width=8, channels=3))
    assert len(warnings) == 1 and "broken.png" in warnings[0] and "skipping" in warnings[0]
    assert len(data.train) + len(data.validation) == 120


def test_bad_folders(tmp_path: Path) -> None:
    spec = InputSpec(height=8, width=8, channels=3)
    with pytest.raises(DataNotFoundError, match="no such folder"):
        userdata.load(f"folder:{tmp_path / 'nowhere'}", spec)
    only = tmp_path / "one"
    (only / "cat").mkdir(parents=True)
    with pytest.raises(DataFormatError, match=r"found 1 class folder\(s\) \(cat\)"):
        userdata.load(f"folder:{only}", spec)
    pets = write_folder(tmp_path / "pets", n_train=30, n_test=6)
    (pets / "test" / "yak").mkdir()
    with pytest.raises(DataFormatError, match="test has classes the training images lack: yak"):
        userdata.load(f"folder:{pets}", spec)


def test_npz_infers_spec_classes_and_validation(tmp_path: Path) -> None:
    data, warnings = userdata.load(f"npz:{write_npz(tmp_path / 'd.npz')}", InputSpec(1, 1, 1))
    assert warnings == []
    assert data.info.input_spec == InputSpec(height=8, width=8, channels=1, dtype="uint8")
    assert data.info.class_names == ("0", "1", "2", "3")
    assert data.info.preprocessing.scale == pytest.approx(1 / 255)
    assert (len(data.train), len(data.validation), len(data.test)) == (183, 17, 40)


def test_npz_without_x_train(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", x_train=True)
    with pytest.raises(DataFormatError, match="lacks x_train"):
        userdata.describe(f"npz:{path}")


def test_function_dataset_from_tf_data_and_arrays() -> None:
    info = userdata.describe("tests.byo_models:make_data")
    assert info.class_names == ("low", "mid", "high")
    assert info.preprocessing == Preprocessing(scale=1 / 255, mean=0.5, std=0.25)  # the function's own
    data, _ = userdata.load("tests.byo_models:make_data", info.input_spec)
    assert data.train.images.shape == (220, 8, 8) and data.test.labels.tolist()[:4] == [0, 1, 2, 0]


def test_function_that_raises_or_cannot_be_imported() -> None:
    with pytest.raises(DataFormatError, match="raised ValueError: the data server is down"):
        userdata.describe("tests.byo_models:broken_data")
    with pytest.raises(UsageError, match=r"cannot import tests\.no_such_module"):
        userdata.describe("tests.no_such_module:make")


def test_run_spec_accepts_references_and_needs_their_input_spec() -> None:
    fields = dict(model="tests.byo_models:keras_bn", batch_size=8, lr=1e-3, lr_decay_rate=1.0, lr_decay_steps=10,
                  l2=0.0, ema_decay=0.9, seed=0, class_names=CLASSES)
    spec = RunSpec(dataset="folder:/x", input_spec=InputSpec(8, 8, 3), preprocessing=userdata.UINT8_PREPROCESSING,
                   **fields)
    assert spec.to_json()["input_spec"]["channels"] == 3
    with pytest.raises(UsageError, match="must be recorded"):
        RunSpec(dataset="folder:/x", **fields)
    with pytest.raises(UsageError, match="--classes goes with the built-in"):
        RunSpec(dataset="folder:/x", input_spec=InputSpec(8, 8, 3), preprocessing=userdata.UINT8_PREPROCESSING,
                classes=(0, 1), **fields)


@pytest.mark.parametrize(("make", "extra", "code", "message"), [
    (lambda p: p / "nowhere", [], 4, "no such folder"),
    (lambda p: (p / "one" / "cat").mkdir(parents=True) or p / "one", [], 2, "found 1 class folder"),
    (lambda p: write_folder(p / "pets"), ["--image-size", "8by8"], 2, "--image-size ('8by8') must be"),
])
def test_trainer_refuses_bad_folders_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str], make, extra,
                                                    code, message) -> None:
    folder = make(tmp_path)
    workdir = tmp_path / "run"
    got, _, err = run_trainer_cli(["--dataset", f"folder:{folder}", "--model", "softmax", "--workdir", str(workdir),
                                   *extra], capsys)
    assert got == code and message in err and err.count("\n") == 1
    assert not workdir.exists()


def test_trainer_refuses_image_size_for_builtin_and_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_trainer_cli(["--dataset", "mnist", "--image-size", "32x32", "--workdir", str(tmp_path / "r")],
                                   capsys)
    assert code == 2 and "go with folder: datasets; mnist is 28x28x1 uint8" in err
    path = write_npz(tmp_path / "d.npz", x_train=True)
    code, _, err = run_trainer_cli(["--dataset", f"npz:{path}", "--workdir", str(tmp_path / "r")], capsys)
    assert code == 2 and "lacks x_train" in err and not (tmp_path / "r").exists()


def test_a_folder_too_large_for_memory_stays_in_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "pets")
    (root / "emu" / "broken.png").write_bytes(b"not an image")
    spec = InputSpec(height=8, width=8, channels=3)
    in_memory, _ = userdata.load(f"folder:{root}", spec)
    monkeypatch.setattr(userdata, "MAX_DECODED_BYTES", 1000)
    streamed, warnings = userdata.load(f"folder:{root}", spec)
    assert isinstance(streamed.train.images, userdata.FileImages)
    assert len(warnings) == 1 and "broken.png" in warnings[0]
    # The same images, decoded when indexed: the same split, the same pixels.
    for name in ("train", "validation", "test"):
        assert np.array_equal(streamed.split(name).images[:], in_memory.split(name).images)
        assert np.array_equal(streamed.split(name).labels, in_memory.split(name).labels)
    assert datasets.fingerprint(streamed) == datasets.fingerprint(userdata.load(f"folder:{root}", spec)[0])
    workdir = tmp_path / "run"
    code, _, err = run_trainer_cli(["--dataset", f"folder:{root}", "--image-size", "8x8", "--model", "softmax",
                                    "--workdir", str(workdir), "--steps", "20", "--save-every", "20",
                                    "--batch-size", "16", "--progress", "plain"], capsys)
    assert code == 0, err
    assert "skipping" in err and "broken.png" in err  # the trainer's warning line
    final = json.loads((workdir / "done.json").read_text())["ema_metrics"]["validation"]
    assert final["count"] == 10 and final["accuracy"] > 0.5
