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
import tensorflow as tf
from PIL import Image

from common.checkpoint import checkpoints
from common.layout import DONE_FILE, STOP_REQUEST_FILE
from common.run.ledger import Ledger
from common.storage import Storage, open_storage
from common.storage.paths import BucketPath
from evaluator.config import EvalConfig
from tests.cloud import Servers
from tests.fault.mw_storm import Job
from tests.helpers import (
    Spy,
    committed_step,
    run_evaluator_cli,
    run_trainer_cli,
    watch_beside,
)

pytestmark = pytest.mark.cloud


def _train(workdir: str, tiny_data: Path, steps: int, capsys: pytest.CaptureFixture[str],
           *extra: str) -> tuple[int, str, str]:
    return run_trainer_cli(["--workdir", workdir, "--data-dir", str(tiny_data), "--model", "softmax",
                            "--steps", str(steps), "--save-every", "10", "--steps-per-loop", "5", *extra], capsys)


def test_train_resume_evaluate_best_and_export_from_a_bucket(bucket_workdir: str, tiny_data: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _train(bucket_workdir, tiny_data, 20, capsys, "--keep", "0")
    assert code == 0, err
    assert "starting fresh" in out + err and "TensorBoard" not in out + err
    # TensorBoard's event file, written locally and copied into the bucket: the trainer's scalars, by step.
    storage = open_storage(bucket_workdir)
    assert {"loss", "lr", "steps_per_sec"} <= _tags(storage, "tb/train", tmp_path)
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
    rows = Ledger(open_storage(BucketPath(bucket_workdir))).read()
    assert sorted(r["step"] for r in rows if r["status"] == "ok") == [10, 20, 30]
    best = json.loads(storage.read("eval/best.json") or b"{}")
    assert best["checkpoint"] in {"model-10", "model-20", "model-30"}
    assert {"validation/accuracy/ema", "validation/loss/ema"} <= _tags(storage, "tb/eval", tmp_path)

    code, out, err = run_evaluator_cli(["best", "--workdir", bucket_workdir], capsys)
    assert code == 0, err
    assert best["checkpoint"] in out

    code, out, err = run_evaluator_cli(["export", "--workdir", bucket_workdir], capsys)
    assert code == 2 and "give --out" in err and err.count("\n") == 1
    code, out, err = run_evaluator_cli(["export", "--workdir", bucket_workdir, "--out", str(tmp_path / "exp")], capsys)
    assert code == 0, err
    assert (tmp_path / "exp" / "saved_model.pb").is_file()
    assert json.loads((tmp_path / "exp" / "export.json").read_text())["workdir"] == bucket_workdir


def _tags(storage: Any, folder: str, tmp_path: Path) -> set[str]:
    """The scalar tags of the one TensorBoard event file in `folder` of a bucket workdir (copied there)."""
    [events] = storage.names(folder, "events.out.tfevents.*")
    local = tmp_path / folder.replace("/", "-")
    local.write_bytes(storage.read(f"{folder}/{events}") or b"")
    return {v.tag for e in tf.compat.v1.train.summary_iterator(str(local)) for v in e.summary.value}


def test_a_missing_bucket_is_one_line_and_exit_2(bucket_workdir: str, tiny_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    scheme = bucket_workdir.partition("://")[0]
    missing = f"{scheme}://no-such-bucket-here/run"
    for code, _, err in (_train(missing, tiny_data, 10, capsys),
                         run_evaluator_cli(["--workdir", missing, "--data-dir", str(tiny_data), "--once"], capsys)):
        assert code == 2, err
        assert err.count("\n") == 1 and "does not exist" in err
    # Named by another flag, the refusal names that flag.
    code, _, err = run_trainer_cli(["--workdir", str(tmp_path / "local"), "--data-dir", str(tiny_data), "--model",
                                    "softmax", "--steps", "5", "--init-from", missing], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"--init-from {missing}: the bucket 'no-such-bucket-here' does not exist" in err, err
    from evaluator.serving import predict

    image = tmp_path / "digit.png"
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(image)
    assert predict.main(["--model", f"{missing}/model-10", str(image)]) == 2
    err = capsys.readouterr().err
    assert f"--model {missing}/model-10: the bucket 'no-such-bucket-here' does not exist" in err, err
    assert "--workdir" not in err


# The watch loop is the same on both stores (each store's poller: tests/common/storage); GCS is a long variant.
@pytest.mark.parametrize("scheme", ["s3", pytest.param("gs", marks=pytest.mark.soak)])
def test_watch_beside_the_trainer_until_patience_stops_it(scheme: str, cloud: Servers, tiny_data: Path) -> None:
    bucket_workdir = f"{scheme}://{cloud.new_bucket(scheme)}/run"
    # An improvement of more than 50 points is impossible: the second evaluation exhausts patience 1.
    workdir = BucketPath(bucket_workdir)
    stop, out, err, code = watch_beside(
        "trainer.cli",
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
    rows = Ledger(open_storage(workdir)).read()
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
    rows = Ledger(open_storage(BucketPath(bucket_workdir))).read()
    assert {r["checkpoint"]: r["status"] for r in rows} == {"model-10": "ok", "model-20": "error"}  # never raw weights
    reason = next(r["reason"] for r in rows if r["status"] == "error")
    assert f"{bucket_workdir}/model-20" in reason and "ckpt-watch-pin" not in reason  # its URL, not the local copy

    storage.write(checkpoints.STATE_FILE, b"garbage \x00 not a state file\n")
    code, out, err = _train(bucket_workdir, tiny_data, 30, capsys, "--keep", "0")
    assert code == 0, err
    assert "falling back to the checkpoints on disk" in err
    assert "skipping checkpoint model-20" in err and "resumed from model-10 (step 10)" in out + err
    assert checkpoints.read_state(storage).latest == "model-30"  # type: ignore[union-attr]


def _delete_shards_during_downloads(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, a download of a checkpoint's data shard finds it deleted (retention, as the download starts)."""
    fs = storage.bucket.fs  # type: ignore[attr-defined]
    real_get = fs.get_file

    def delete_first(remote: str, local: str, **kwargs: Any) -> Any:
        if ".data-" in remote:
            fs.rm_file(remote)  # the trainer's retention, just as the download starts
        return real_get(remote, local, **kwargs)

    monkeypatch.setattr(fs, "get_file", delete_first)


def test_an_object_deleted_during_the_download_is_gone(bucket_workdir: str, tiny_data: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert _train(bucket_workdir, tiny_data, 10, capsys, "--keep", "0")[0] == 0
    _delete_shards_during_downloads(open_storage(bucket_workdir), monkeypatch)
    code, _, err = run_evaluator_cli(["--workdir", bucket_workdir, "--data-dir", str(tiny_data), "--once"], capsys)
    assert code == 0, err
    assert [r["status"] for r in Ledger(open_storage(BucketPath(bucket_workdir))).read()] == ["gone"]


def test_retention_spares_a_checkpoint_an_evaluator_holds(bucket_workdir: str, tiny_data: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(bucket_workdir, tiny_data, 10, capsys, "--keep", "1")[0] == 0
    storage = open_storage(bucket_workdir)
    with storage.lease("model-10"):
        assert _train(bucket_workdir, tiny_data, 40, capsys, "--keep", "1")[0] == 0
        assert checkpoints.on_disk(storage) == [10, 40]
    assert _train(bucket_workdir, tiny_data, 50, capsys, "--keep", "1")[0] == 0
    assert checkpoints.on_disk(storage) == [50]  # released: the next save deletes it


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


REPORT_FILES = ["accuracy_curve.png", "confusion.png", "confusion.txt", "metrics.json", "misclassified.png",
                "per_class.txt"]


def test_report_of_a_bucket_workdir_is_uploaded_metrics_last(bucket_workdir: str, tiny_data: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert _train(bucket_workdir, tiny_data, 20, capsys, "--keep", "0")[0] == 0
    assert run_evaluator_cli(["--workdir", bucket_workdir, "--data-dir", str(tiny_data), "--once"], capsys)[0] == 0
    storage = open_storage(bucket_workdir)
    step = json.loads(storage.read("eval/best.json") or b"{}")["step"]
    code, out, err = run_evaluator_cli(["report", "--workdir", bucket_workdir, "--data-dir", str(tiny_data)], capsys)
    assert code == 0, err
    assert out.splitlines() == [f"report written to {bucket_workdir}/eval/report-{step}/",
                                *(f"  {name}" for name in REPORT_FILES)]
    assert storage.names(f"eval/report-{step}") == REPORT_FILES
    metrics = json.loads(storage.read(f"eval/report-{step}/metrics.json") or b"{}")
    assert metrics["step"] == step and metrics["checkpoint"].startswith(f"{bucket_workdir}/eval/best-")
    assert sum(map(sum, metrics["confusion"])) == 50
    assert (storage.read(f"eval/report-{step}/confusion.png") or b"").startswith(b"\x89PNG")

    # A second report of a step replaces the first: what it does not rewrite goes, metrics.json comes last.
    storage.write("eval/report-10/stale.txt", b"from an older report")
    storage.write("eval/report-10/metrics.json", b"{}")
    written: list[str] = []
    real_write = storage.write
    monkeypatch.setattr(storage, "write", lambda key, data: (written.append(key), real_write(key, data))[1])
    code, out, err = run_evaluator_cli(["report", "--workdir", bucket_workdir, "--data-dir", str(tiny_data),
                                        "--step", "10", "--split", "test"], capsys)
    assert code == 0, err
    assert written[-1] == "eval/report-10/metrics.json" and len(written) == len(REPORT_FILES)
    assert storage.names("eval/report-10") == REPORT_FILES
    assert json.loads(storage.read("eval/report-10/metrics.json") or b"{}")["split"] == "test"

    _delete_shards_during_downloads(storage, monkeypatch)
    code, _, err = run_evaluator_cli(["report", "--workdir", bucket_workdir, "--data-dir", str(tiny_data),
                                      "--step", "20"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "step 20 is no longer in the bucket (model-20.data-" in err and "deleted while being read" in err


def test_trainer_from_a_checkpoint_of_a_bucket(bucket_workdir: str, tiny_data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert _train(bucket_workdir, tiny_data, 20, capsys, "--keep", "0")[0] == 0
    storage = open_storage(bucket_workdir)
    code, out, err = _train(bucket_workdir, tiny_data, 30, capsys, "--keep", "0", "--from", "model-10")
    assert code == 0, err
    assert "resumed from model-10 (step 10)" in out
    assert checkpoints.read_state(storage).paths == ["model-10", "model-20", "model-30"]  # type: ignore[union-attr]
    code, out, err = _train(bucket_workdir, tiny_data, 30, capsys, "--keep", "0", "--from",
                            f"{bucket_workdir}/model-20")
    assert code == 0, err
    assert "resumed from model-20 (step 20)" in out
    local = tmp_path / "local"  # a local run may start from a bucket's checkpoint too
    code, out, err = run_trainer_cli(["--workdir", str(local), "--data-dir", str(tiny_data), "--model", "softmax",
                                      "--steps", "40", "--save-every", "10", "--from", f"{bucket_workdir}/model-30"],
                                     capsys)
    assert code == 0, err
    assert "resumed from model-30 (step 30)" in out and checkpoints.on_disk(open_storage(local)) == [40]

    before = storage.read(checkpoints.STATE_FILE)
    shards = [k for k in storage.checkpoint_files("model-10") if ".data-" in k]
    storage.write(shards[0], b"cut")
    elsewhere = f"{bucket_workdir.partition('://')[0]}://no-such-bucket-here/run/model-10"
    for name, why in (("model-5", "--from model-5: model-5.index is missing"), ("model-10", "--from model-10: "),
                      ("../run/model-20", "--from ../run/model-20: not a checkpoint of a bucket"),
                      (elsewhere, f"--from {elsewhere}: the bucket 'no-such-bucket-here' does not exist")):
        code, _, err = _train(bucket_workdir, tiny_data, 40, capsys, "--from", name)
        assert code == 2 and err.count("\n") == 1 and why in err, err
    _delete_shards_during_downloads(storage, monkeypatch)
    code, _, err = _train(bucket_workdir, tiny_data, 40, capsys, "--from", "model-20")
    assert code == 2 and err.count("\n") == 1 and "--from model-20: model-20.data-" in err, err
    assert storage.read(checkpoints.STATE_FILE) == before  # a refused start changed nothing


def test_what_a_bucket_workdir_does_not_take_yet_is_one_line(bucket_workdir: str, tiny_data: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_evaluator_cli(["report", "--workdir", bucket_workdir, "--data-dir", str(tiny_data),
                                      "--tf1-graph", "--input", "x:0", "--output", "y:0", "--dataset", "mnist"], capsys)
    assert code == 2 and err.count("\n") == 1 and "a bucket workdir is not supported here yet" in err
    assert "evaluator report --tf1-graph --workdir" in err


@pytest.mark.slow
def test_a_two_worker_job_on_a_bucket_workdir(cloud: Servers, tiny_data: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # On S3 only: a job costs two TensorFlow imports side by side (about 11 s here).
    workdir = f"s3://{cloud.new_bucket('s3')}/run"
    job = Job(["--workdir", workdir, "--data-dir", str(tiny_data), "--model", "softmax", "--steps", "20",
               "--save-every", "10", "--steps-per-loop", "5", "--keep", "0", "--progress", "plain"])
    assert job.finish() == 0, job.err[-5:]
    assert any(line.startswith("[worker 0] ") and " trainer final step=20 " in line for line in job.out), job.out
    assert "[worker 1] finished at step 20; the chief evaluates the EMA weights" in job.out
    storage = open_storage(workdir)
    assert committed_step(storage) == 20
    run = json.loads(storage.read("run.json") or b"{}")
    assert (run["strategy"], run["replicas"], run["workers"]) == ("multi-worker", 2, 2)
    # Only the chief wrote the bucket, and what a single trainer writes: no lock left, no scratch part.
    assert {n for n in storage.names() if not n.startswith("model-")} == {"checkpoint", "done.json",
                                                                          "heartbeat.json", "run.json", "tb"}
    assert storage.names("tb") == ["train"]  # the chief's TensorBoard log, one
    code, _, err = run_evaluator_cli(["--workdir", workdir, "--data-dir", str(tiny_data), "--once"], capsys)
    assert code == 0, err
    rows = Ledger(open_storage(BucketPath(workdir))).read()
    assert sorted((r["checkpoint"], r["status"]) for r in rows) == [("model-10", "ok"), ("model-20", "ok")]


def test_a_bucket_checkpoint_that_does_not_restore_is_named_by_its_url(cloud: Servers, tiny_data: Path,
                                                                       tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Readable files of another model under model-10: the refusal names the checkpoint's URL, not the download."""
    workdir = f"s3://{cloud.new_bucket('s3')}/run"
    assert _train(workdir, tiny_data, 10, capsys, "--keep", "0")[0] == 0
    other = tmp_path / "other"
    code, _, err = run_trainer_cli(["--workdir", str(other), "--data-dir", str(tiny_data), "--model", "mlp",
                                    "--steps", "10", "--save-every", "10"], capsys)
    assert code == 0, err
    storage = open_storage(workdir)
    for key in storage.checkpoint_files("model-10"):
        storage.delete(key)
    for file in other.glob("model-10.*"):
        storage.write(file.name, file.read_bytes())
    code, _, err = _train(workdir, tiny_data, 20, capsys, "--keep", "0")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{workdir}/model-10: cannot restore" in err and "ckpt-watch-" not in err, err
