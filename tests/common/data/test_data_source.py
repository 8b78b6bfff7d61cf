"""run.json records where the data came from, so the evaluator needs nothing but --workdir."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.data import datasets
from common.errors import DataNotFoundError
from common.run.spec import read_run
from common.run.workdir import Workdir
from common.storage import open_storage
from evaluator.report import write_report
from tests.helpers import Recorder, run_evaluator_cli, write_dataset
from trainer.loop import train


@pytest.fixture
def trained_from(make_config: Callable[..., Any], tiny_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(workdir, data folder): a tiny run trained with --data-dir on a private copy of the tiny data."""
    folder = Path(shutil.copytree(tiny_data, tmp_path / "mydata"))
    cfg = make_config(data_dir=str(folder), steps=20, save_every=20)
    train(cfg, reporter=Recorder())
    return cfg.workdir, folder


@pytest.fixture
def no_usual_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every usual place empty (./data, the OS package folder, the Keras cache) and the download fail."""
    def no_download(info: datasets.DatasetInfo) -> Path:
        raise DataNotFoundError("no network in the tests")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setitem(datasets.DATASETS, "fashion-mnist",
                        dataclasses.replace(datasets.DATASETS["fashion-mnist"], system_dirs=()))
    monkeypatch.setattr(datasets, "fetch", no_download)


def evaluate_once(workdir: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    """`evaluator --workdir W --once`; stdout with its line wrapping undone."""
    code, out, err = run_evaluator_cli(["--workdir", str(workdir), "--once", *extra], capsys)
    return code, " ".join(out.split()), err


def test_run_json_records_the_folder_and_fingerprint(trained_from: tuple[Path, Path]) -> None:
    workdir, folder = trained_from
    spec = read_run(open_storage(workdir))
    assert spec is not None
    assert spec.data_source == str(folder.resolve())
    assert spec.data_fingerprint == datasets.fingerprint(datasets.load("fashion-mnist", str(folder)))
    assert len(spec.data_fingerprint) == 16 and int(spec.data_fingerprint, 16) >= 0


@pytest.mark.usefixtures("no_usual_places")
def test_evaluator_needs_only_the_workdir(trained_from: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    workdir, _ = trained_from
    code, out, err = evaluate_once(workdir, capsys)
    assert code == 0, err
    assert "model-20" in out and "differ" not in out and "no longer" not in out


def test_changed_data_are_a_warning(trained_from: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    workdir, folder = trained_from
    write_dataset(folder, seed=7)  # same files, other images
    code, out, err = evaluate_once(workdir, capsys)
    assert code == 0, err
    recorded = read_run(open_storage(workdir)).data_fingerprint  # type: ignore[union-attr]
    assert f"differ from the data this run was trained on (fingerprint {recorded})" in out
    code, out, err = evaluate_once(workdir, capsys, "--json")
    assert code == 0 and "evaluator: warning:" in err and "differ from the data" in err


@pytest.mark.usefixtures("no_usual_places")
def test_a_removed_folder_falls_back_and_says_so(trained_from: tuple[Path, Path], tiny_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    workdir, folder = trained_from
    shutil.rmtree(folder)
    shutil.copytree(tiny_data, tmp_path / "data" / "fashion-mnist")  # the first of the usual places
    code, out, err = evaluate_once(workdir, capsys)
    assert code == 0, err
    assert f"{folder.resolve()}, no longer holds fashion-mnist; looking in the usual places" in out
    assert "differ from the data" not in out  # the same data, found elsewhere


def test_data_dir_still_overrides(trained_from: tuple[Path, Path], tiny_data: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    workdir, folder = trained_from
    shutil.rmtree(folder)
    code, out, err = evaluate_once(workdir, capsys, "--data-dir", str(tiny_data))
    assert code == 0, err
    assert "no longer" not in out and "differ" not in out


def test_report_uses_the_recorded_folder(trained_from: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    workdir, folder = trained_from
    assert evaluate_once(workdir, capsys)[0] == 0
    warnings: list[str] = []
    out = write_report(Workdir.open(workdir), step="20", warn=warnings.append)
    assert (out / "metrics.json").is_file() and warnings == []
    write_dataset(folder, seed=7)
    write_report(Workdir.open(workdir), step="20", warn=warnings.append)
    assert len(warnings) == 1 and "differ from the data" in warnings[0]


def test_old_run_json_without_the_fields(trained_from: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    workdir, folder = trained_from
    run_file = workdir / "run.json"
    old = {k: v for k, v in json.loads(run_file.read_text()).items() if not k.startswith("data_")}
    run_file.write_text(json.dumps(old))
    spec = read_run(open_storage(workdir))
    assert spec is not None and spec.data_source == "" and spec.data_fingerprint == ""
    code, out, err = evaluate_once(workdir, capsys, "--data-dir", str(folder))
    assert code == 0, err
    assert "model-20" in out and "differ" not in out


@pytest.mark.usefixtures("no_usual_places")
def test_resume_keeps_the_recorded_source(trained_from: tuple[Path, Path], make_config: Callable[..., Any]) -> None:
    workdir, folder = trained_from
    before = json.loads((workdir / "run.json").read_text())
    reporter = Recorder()
    result = train(make_config(data_dir=None, steps=40, save_every=20), reporter=reporter)
    assert result.final_step == 40
    assert any(m.startswith(f"data: fashion-mnist from {folder.resolve()}") for m in reporter.messages)
    assert json.loads((workdir / "run.json").read_text()) == before
