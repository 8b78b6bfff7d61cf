"""The programs on a bucket workdir (`s3://` and `gs://`, servers on 127.0.0.1): trainer, evaluator, best, export.

Each test runs against both stores through the `bucket_workdir` fixture. The programs run in this
process (their `main`), as a user's command line would call them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common import checkpoints
from common.paths import BucketPath
from common.storage import open_storage
from common.workdir import DONE_FILE, STOP_REQUEST_FILE
from evaluator.config import EvalConfig
from evaluator.ledger import Ledger
from tests.helpers import Spy, run_evaluator_cli, run_trainer_cli, two_evaluators_at_once, watch_beside_trainer

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.cloud


def _train(workdir: str, tiny_data: Path, steps: int, capsys: pytest.CaptureFixture[str],
           *extra: str) -> tuple[int, str, str]:
    return run_trainer_cli(["--workdir", workdir, "--data-dir", str(tiny_data), "--model", "softmax",
                            "--steps", str(steps), "--save-every", "10", "--steps-per-loop", "5", *extra], capsys)


def test_train_resume_evaluate_best_and_export_from_a_bucket(bucket_workdir: str, tiny_data: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _train(bucket_workdir, tiny_data, 20, capsys, "--keep", "0")
    assert code == 0, err
    assert "starting fresh" in out + err and "TensorBoard logs are not written for a bucket workdir" in out + err
    storage = open_storage(bucket_workdir)
    state = checkpoints.read_state(storage)
    assert state is not None and state.latest == "model-20" and state.paths == ["model-10", "model-20"]
    assert storage.stat(DONE_FILE) is not None and storage.stat("run.json") is not None
    assert not Path("s3:").exists() and not Path("gs:").exists()  # nothing went to a local folder named after it

    code, out, err = _train(bucket_workdir, tiny_data, 30, capsys, "--keep", "0")
    assert code == 0, err
    assert "resumed from model-20 (step 20)" in out + err
    assert checkpoints.read_state(storage).latest == "model-30"  # type: ignore[union-attr]

    code, out, err = run_evaluator_cli(["--workdir", bucket_workdir, "--data-dir", str(tiny_data), "--once"], capsys)
    assert code == 0, err
    rows = Ledger(BucketPath(bucket_workdir)).read()
    assert sorted(r["step"] for r in rows if r["status"] == "ok") == [10, 20, 30]
    best = json.loads(storage.read("eval/best.json") or b"{}")
    assert best["checkpoint"] in {"model-10", "model-20", "model-30"}

    code, out, err = run_evaluator_cli(["best", "--workdir", bucket_workdir], capsys)
    assert code == 0, err
    assert best["checkpoint"] in out

    code, out, err = run_evaluator_cli(["export", "--workdir", bucket_workdir], capsys)
    assert code == 2 and "give --out" in err and err.count("\n") == 1
    code, out, err = run_evaluator_cli(["export", "--workdir", bucket_workdir, "--out", str(tmp_path / "exp")], capsys)
    assert code == 0, err
    assert (tmp_path / "exp" / "saved_model.pb").is_file()
    assert json.loads((tmp_path / "exp" / "export.json").read_text())["workdir"] == bucket_workdir


def test_a_missing_bucket_is_one_line_and_exit_2(bucket_workdir: str, tiny_data: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    scheme = bucket_workdir.partition("://")[0]
    missing = f"{scheme}://no-such-bucket-here/run"
    for code, _, err in (_train(missing, tiny_data, 10, capsys),
                         run_evaluator_cli(["--workdir", missing, "--data-dir", str(tiny_data), "--once"], capsys)):
        assert code == 2, err
        assert err.count("\n") == 1 and "does not exist" in err


def test_watch_beside_the_trainer_until_patience_stops_it(bucket_workdir: str, tiny_data: Path) -> None:
    # An improvement of more than 50 points is impossible: the second evaluation exhausts patience 1.
    workdir = BucketPath(bucket_workdir)
    stop, out, err, code = watch_beside_trainer(
        ["--workdir", bucket_workdir, "--data-dir", str(tiny_data), "--model", "softmax", "--steps", "100000",
         "--save-every", "50", "--keep", "0", "--progress", "plain", "--log-every", "1000000"],
        EvalConfig(workdir=workdir, data_dir=str(tiny_data), exit_when_done=True, patience=1, min_delta=0.5,
                   poll_secs=0.2), Spy())
    assert code == 0, err
    assert stop.reason is None
    storage = open_storage(workdir)
    request = json.loads(storage.read(STOP_REQUEST_FILE) or b"{}")
    assert request["reason"].startswith("no improvement of more than 0.5")
    stopped = [line for line in out.splitlines() if line.startswith("stopped early at step ")]
    assert stopped, out
    done = json.loads(storage.read(DONE_FILE) or b"{}")
    assert done["stop_reason"].startswith("early stop requested by the evaluator")
    rows = Ledger(workdir).read()
    assert rows and {r["status"] for r in rows} == {"ok"}
    assert len({(r["checkpoint"], r["weights"]) for r in rows}) == len(rows)  # no row twice


def test_a_truncated_object_and_a_garbage_state_file(bucket_workdir: str, tiny_data: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(bucket_workdir, tiny_data, 20, capsys, "--keep", "0")[0] == 0
    storage = open_storage(bucket_workdir)
    shards = {k: storage.read(k) or b"" for k in storage.checkpoint_files("model-20") if ".data-" in k}
    data = max(shards, key=lambda k: len(shards[k]))  # the one with the weights
    storage.write(data, shards[data][:64])  # cut short: every tensor past byte 64 is gone
    code, _, err = run_evaluator_cli(["--workdir", bucket_workdir, "--data-dir", str(tiny_data), "--once"], capsys)
    assert code == 0, err
    status = {r["checkpoint"]: r["status"] for r in Ledger(BucketPath(bucket_workdir)).read()}
    assert status == {"model-10": "ok", "model-20": "error"}  # never the raw weights instead

    storage.write(checkpoints.STATE_FILE, b"garbage \x00 not a state file\n")
    code, out, err = _train(bucket_workdir, tiny_data, 30, capsys, "--keep", "0")
    assert code == 0, err
    assert "falling back to the checkpoints on disk" in err
    assert "skipping checkpoint model-20" in err and "resumed from model-10 (step 10)" in out + err
    assert checkpoints.read_state(storage).latest == "model-30"  # type: ignore[union-attr]


def test_an_object_deleted_during_the_download_is_gone(bucket_workdir: str, tiny_data: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert _train(bucket_workdir, tiny_data, 10, capsys, "--keep", "0")[0] == 0
    storage = open_storage(bucket_workdir)
    fs = storage.bucket.fs  # type: ignore[attr-defined]
    real_get = fs.get_file

    def delete_first(remote: str, local: str, **kwargs: Any) -> Any:
        if ".data-" in remote:
            fs.rm_file(remote)  # the trainer's retention, just as the download starts
        return real_get(remote, local, **kwargs)

    monkeypatch.setattr(fs, "get_file", delete_first)
    code, _, err = run_evaluator_cli(["--workdir", bucket_workdir, "--data-dir", str(tiny_data), "--once"], capsys)
    assert code == 0, err
    assert [r["status"] for r in Ledger(BucketPath(bucket_workdir)).read()] == ["gone"]


def test_retention_spares_a_checkpoint_an_evaluator_holds(bucket_workdir: str, tiny_data: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(bucket_workdir, tiny_data, 10, capsys, "--keep", "1")[0] == 0
    storage = open_storage(bucket_workdir)
    with storage.lease("model-10"):
        assert _train(bucket_workdir, tiny_data, 40, capsys, "--keep", "1")[0] == 0
        assert checkpoints.on_disk(storage) == [10, 40]
    assert _train(bucket_workdir, tiny_data, 50, capsys, "--keep", "1")[0] == 0
    assert checkpoints.on_disk(storage) == [50]  # released: the next save deletes it


def test_two_evaluators_on_one_bucket_workdir(bucket_workdir: str, tiny_data: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(bucket_workdir, tiny_data, 30, capsys, "--keep", "0")[0] == 0
    two_evaluators_at_once(bucket_workdir, tiny_data)
    rows = Ledger(BucketPath(bucket_workdir)).read()
    keys = [(r["checkpoint"], r["weights"]) for r in rows if r["status"] == "ok"]
    assert sorted(set(keys)) == [(f"model-{s}", w) for s in (10, 20, 30) for w in ("ema", "raw")]  # none lost
    assert len(keys) == len(set(keys))  # none twice


def test_predict_and_init_from_read_a_bucket_workdir(bucket_workdir: str, tiny_data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from evaluator.serving import predict

    assert _train(bucket_workdir, tiny_data, 20, capsys, "--keep", "0")[0] == 0
    image = tmp_path / "digit.png"
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(image)
    for model in (bucket_workdir, f"{bucket_workdir}/model-10"):  # a workdir (its latest), and a prefix
        assert predict.main(["--model", model, "--json", str(image)]) == 0
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert Path(row["file"]).name == "digit.png" and len(row["top"]) >= 1
    assert predict.main(["--model", f"{bucket_workdir}/model-99", str(image)]) == 2
    assert "a workdir without checkpoints" in capsys.readouterr().err  # a bucket has no folders to tell apart

    code, out, err = run_trainer_cli(["--workdir", str(tmp_path / "local"), "--data-dir", str(tiny_data),
                                      "--model", "softmax", "--steps", "5", "--init-from", bucket_workdir], capsys)
    assert code == 0, err
    assert "restored from model/" in out + err  # the table of what the new run took from model-20


def test_what_a_bucket_workdir_does_not_take_yet_is_one_line(bucket_workdir: str, tiny_data: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_evaluator_cli(["report", "--workdir", bucket_workdir, "--data-dir", str(tiny_data)], capsys)
    assert code == 2 and err.count("\n") == 1 and "a bucket workdir is not supported here yet" in err
    code, _, err = _train(bucket_workdir, tiny_data, 10, capsys, "--from", "model-5")
    assert code == 2 and err.count("\n") == 1 and "--from goes with a local --workdir" in err
