from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data import datasets
from common.errors import DataFormatError, DataNotFoundError, UsageError
from tests.helpers import write_dataset


def test_load_from_data_dir_and_splits(tiny_data: Path) -> None:
    data = datasets.load("fashion-mnist", str(tiny_data))
    # 1/12 of the training file is held out, as the tutorials' 5,000 of 60,000.
    assert (len(data.train), len(data.validation), len(data.test)) == (550, 50, 200)
    assert data.train.images.dtype == np.uint8 and data.train.images.shape[1:] == (28, 28)
    assert data.source == str(tiny_data)
    assert data.info.class_names[0] == "T-shirt/top" and len(data.info.class_names) == 10


@pytest.mark.parametrize("n_train", [24, 121, 600])
def test_validation_holds_out_a_twelfth_without_overlap(tmp_path: Path, n_train: int) -> None:
    folder = write_dataset(tmp_path / "d", n_train=n_train, n_test=10)
    data = datasets.load("fashion-mnist", str(folder))
    from common.data.idx import read_idx

    images = read_idx(folder / "train-images-idx3-ubyte.gz", ndim=3)
    assert len(data.validation) == round(n_train / 12) and len(data.train) + len(data.validation) == n_train
    # Together the two splits are the training file, in order: no image lost, none in both.
    np.testing.assert_array_equal(np.concatenate([data.train.images, data.validation.images]), images)


def test_validation_is_the_tail_of_the_training_file(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "d", n_train=120, n_test=10)
    from common.data.idx import read_idx

    labels = read_idx(folder / "train-labels-idx1-ubyte.gz", ndim=1)
    data = datasets.load("mnist", str(folder))
    np.testing.assert_array_equal(data.validation.labels, labels[-10:])
    np.testing.assert_array_equal(data.train.labels, labels[:-10])
    assert data.info.class_names == tuple("0123456789")


def test_dotted_raw_spelling(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "dotted", gz=False, dotted=True)
    assert len(datasets.load("mnist", str(folder)).test) == 200


def test_unknown_dataset() -> None:
    with pytest.raises(UsageError, match=r"unknown dataset 'cifar'.*fashion-mnist, mnist"):
        datasets.load("cifar")


def test_data_dir_without_files(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"--data-dir .*no complete set of IDX files"):
        datasets.load("mnist", str(tmp_path))


def test_labels_images_count_mismatch(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "d")
    from common.data.idx import write_idx

    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataFormatError, match=r"200 images but 5 labels"):
        datasets.load("mnist", str(folder))


def test_search_order_and_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    places = [str(p) for p in datasets.candidate_sources(datasets.get_info("fashion-mnist"), None)]
    assert places == ["data/fashion-mnist", "/usr/share/datasets/fashion-mnist",
                      str(tmp_path / "keras" / "datasets" / "fashion-mnist")]
    monkeypatch.setattr(datasets, "fetch", _failing_fetch)
    with pytest.raises(DataNotFoundError) as err:
        datasets.load("mnist")
    message = str(err.value)
    assert "data/mnist" in message and "mnist.npz" in message
    assert "make data DATASET=mnist" in message and "no network here" in message


def _failing_fetch(info: datasets.DatasetInfo) -> Path:
    raise DataNotFoundError("URLError: no network here")


def test_local_data_folder_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dataset(tmp_path / "data" / "mnist", n_train=240)
    monkeypatch.chdir(tmp_path)
    data = datasets.load("mnist", download=False)
    assert data.source == "data/mnist" and len(data.validation) == 20


def test_keras_npz_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    (tmp_path / "keras" / "datasets").mkdir(parents=True)
    x, y = np.zeros((24, 28, 28), np.uint8), np.arange(24, dtype=np.uint8) % 10
    np.savez(tmp_path / "keras" / "datasets" / "mnist.npz", x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])
    data = datasets.load("mnist", download=False)
    assert data.source.endswith("mnist.npz") and (len(data.train), len(data.validation), len(data.test)) == (22, 2, 6)


def test_broken_source_is_an_error_not_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_dataset(tmp_path / "data" / "mnist")
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot gzip at all")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte.gz"):
        datasets.load("mnist", download=False)
