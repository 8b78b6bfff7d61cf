"""What export, report and the path flags must never do: replace what export did not write, follow a URL
into a local folder, ignore the umask, or crash with a traceback."""

from __future__ import annotations

import ast
import io
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluator import cli
from evaluator.serving import export as export_lib
from evaluator.serving.images import ImageError, read_gray
from tests.helpers import REPO


@pytest.fixture
def trained(trained_runs: Callable[..., Path]) -> Path:
    return trained_runs(evaluated=True)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its content: to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def export_cli(workdir: Path, out: Path | str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["export", "--workdir", str(workdir), "--step", "latest", "--out", str(out)])
    return code, capsys.readouterr().err


def test_export_refuses_a_folder_it_did_not_write(workdir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("precious")
    code, err = export_cli(workdir, docs, capsys)
    assert code == 2 and err.count("\n") == 1 and "not an earlier export" in err
    assert (docs / "thesis.txt").read_text() == "precious" and [p.name for p in docs.iterdir()] == ["thesis.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mydocs")]  # no temp folder left


def test_export_refuses_the_workdir_and_a_file(workdir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(workdir)
    code, err = export_cli(workdir, workdir, capsys)
    assert code == 2 and "a folder that is not an earlier export" in err
    assert tree(workdir) == before
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, err = export_cli(workdir, notes, capsys)
    assert code == 2 and "a file that is not an earlier export" in err
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["copy", "notes.txt"]


def test_export_refuses_a_link_even_to_an_export(workdir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert export_cli(workdir, tmp_path / "real", capsys)[0] == 0
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, err = export_cli(workdir, tmp_path / "link", capsys)
    assert code == 2 and "a link" in err and (tmp_path / "real" / export_lib.MARKER_FILE).is_file()


def test_export_replaces_an_earlier_export_and_a_legacy_one(workdir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exp"
    assert export_cli(workdir, out, capsys)[0] == 0
    assert (out / export_lib.MARKER_FILE).is_file() and (out / "saved_model.pb").is_file()
    (out / "saved_model.pb").write_bytes(b"old")
    assert export_cli(workdir, out, capsys)[0] == 0
    assert (out / "saved_model.pb").read_bytes() != b"old"
    (out / export_lib.MARKER_FILE).unlink()  # an export made before the marker existed
    assert export_lib.is_export(out)
    assert export_cli(workdir, out, capsys)[0] == 0
    (out / export_lib.MARKER_FILE).unlink()
    (out / "mine.txt").write_text("not an export's file")
    assert not export_lib.is_export(out)
    assert export_cli(workdir, out, capsys)[0] == 2 and (out / "mine.txt").is_file()
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


@pytest.mark.parametrize("out", ["/", "/proc/foo"])
def test_export_to_an_impossible_place_is_one_line(workdir: Path, out: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, err = export_cli(workdir, out, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("evaluator: error: --out")


def test_export_folder_follows_the_umask(workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    previous = os.umask(0o022)
    try:
        assert export_cli(workdir, tmp_path / "exp", capsys)[0] == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "exp").stat().st_mode) == 0o755


@pytest.mark.parametrize("argv", [
    ["trainer", "--data-dir", "gs://bucket/data", "--workdir", "local"],
    ["evaluator", "export", "--workdir", "local", "--out", "gs://bucket/export"],
    ["predict", "--model", "local", "--labels", "s3://bucket/labels.txt", "x.png"],
])
def test_a_bucket_url_is_refused_not_made_a_local_folder(argv: list[str], tmp_path: Path) -> None:
    program, *rest = argv
    done = subprocess.run([sys.executable, "-c", f"import sys; from {program_module(program)} import main; "
                           "sys.exit(main(sys.argv[1:]))", *rest],
                          capture_output=True, text=True, cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "this flag takes a local path, not a URL" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no ./s3:/bucket/run, nothing else either


@pytest.mark.parametrize("argv", [
    ["trainer", "--workdir", "s3://bucket/run", "--steps", "5"],
    ["evaluator", "--workdir", "s3://bucket/run", "--once"],
    ["predict", "--model", "s3://bucket/run", "x.png"],
])
def test_a_bucket_workdir_without_credentials_is_one_line_not_a_local_folder(argv: list[str], tmp_path: Path) -> None:
    program, *rest = argv
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "PYTHONPATH": str(REPO), "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # never the network: no credentials fail first
    done = subprocess.run([sys.executable, "-c", f"import sys; from {program_module(program)} import main; "
                           "sys.exit(main(sys.argv[1:]))", *rest],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "s3://bucket" in done.stderr and "cannot use the bucket" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no ./s3:/bucket/run, nothing else either


def program_module(program: str) -> str:
    return {"trainer": "trainer.cli", "evaluator": "evaluator.cli", "predict": "evaluator.serving.predict"}[program]


def test_bomb_message_states_the_documented_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((400, 400), np.uint8)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    monkeypatch.setattr("evaluator.serving.images.MAX_PIXELS", 40_000)  # PIL errors at twice this, warns above it
    with pytest.raises(ImageError, match=r"over 40,000 pixels") as caught:
        read_gray(path)
    assert "80,000" not in str(caught.value) and "80000" not in str(caught.value)
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    text = " ".join(" ".join(p.read_text().split()) for p in docs)
    assert "40 million pixels" in text and "40_000_000" in (REPO / "evaluator" / "serving" / "images.py").read_text()


def test_report_never_deletes_through_a_planted_link(workdir: Path, tmp_path: Path, tiny_data: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    step = export_lib.checkpoints.read_step(export_lib.resolve(workdir, "best"))
    (workdir / "eval" / f"report-{step}").symlink_to(outside)
    assert cli.main(["report", "--workdir", str(workdir), "--data-dir", str(tiny_data)]) == 0
    assert (outside / "keep.txt").read_text() == "keep"
    assert (workdir / "eval" / f"report-{step}" / "metrics.json").is_file()


def project_imports(path: Path) -> set[str]:
    """The modules of this project that `path` imports (absolute imports; relative ones stay inside)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in ("common", "trainer", "evaluator", "bench", "tests")}


def test_serving_imports_only_common_and_itself() -> None:
    allowed = ("common", "evaluator.serving")
    strays = {f"{path.name}: {name}" for path in (REPO / "evaluator" / "serving").glob("*.py")
              for name in project_imports(path) if not any(name == a or name.startswith(f"{a}.") for a in allowed)}
    assert not strays


def test_a_refused_delete_is_one_line_not_a_traceback(workdir: Path, tmp_path: Path, tiny_data: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.move(workdir / "eval", elsewhere)  # eval/ now lives outside the workdir, behind a link
    (workdir / "eval").symlink_to(elsewhere)
    step = export_lib.checkpoints.read_step(export_lib.resolve(workdir, "best"))
    (elsewhere / f"report-{step}").mkdir()
    (elsewhere / f"report-{step}" / "mine.txt").write_text("keep")
    code = cli.main(["report", "--workdir", str(workdir), "--data-dir", str(tiny_data)])
    err = capsys.readouterr().err
    assert code == 5 and "refused to delete" in err and "Traceback" not in err
    assert (elsewhere / f"report-{step}" / "mine.txt").read_text() == "keep"


def test_best_json_without_a_checkpoint_is_one_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    best_json = workdir / "eval" / "best.json"
    best_json.unlink()  # a link to best/best.json; a hand-written file replaces it
    best_json.write_text('{"step": 40, "accuracy": 0.5}')
    code = cli.main(["export", "--workdir", str(workdir), "--out", str(workdir.parent / "exp")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no best checkpoint" in err
