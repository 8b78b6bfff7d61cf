"""Watching checkpoints that another TF2 training loop writes: `--model`, `--dataset`, `--restore-map`, `--ema-map`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.run.ledger import Ledger
from common.storage import open_storage
from evaluator.cluster import Cluster
from evaluator.config import EvalConfig
from evaluator.foreign import ForeignFlags
from evaluator.loop import run_once
from tests.helpers import Watched, listing, mirrored, run_evaluator_cli, watch_reference_loop

STEPS, SAVE_EVERY = 60, 10  # 6 saves; the manager's max_to_keep=2 deletes the 4 oldest
MAPS = ("net/*=model/*", "averages/*=model/*")
FLAGS = ["--model", "mlp", "--dataset", "mnist", "--restore-map", MAPS[0], "--ema-map", MAPS[1]]
# A Keras loop's checkpoint names the model's weights by the first path to them, the optimizer's list.
KERAS = ForeignFlags(
    model="tests.byo_models:keras_mlp", dataset="mnist",
    restore_maps=tuple((f"optimizer/_trainable_variables/{i}", f"model/{key}")
                       for i, key in enumerate(("fc1/kernel", "fc1/bias", "fc2/kernel", "fc2/bias"))),
    ema_maps=(("ema/fc1_*", "model/fc1/*"), ("ema/fc2_*", "model/fc2/*")))
PLAIN = ForeignFlags(model="mlp", dataset="mnist", restore_maps=(("net/*", "model/*"),),
                     ema_maps=(("averages/*", "model/*"),))


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Watched:
    """The foreign loop with a plain tf.Module, watched."""
    return watch_loop(tmp_path_factory.mktemp("foreign"), keras=False)


@pytest.fixture(scope="module")
def watched_keras(tmp_path_factory: pytest.TempPathFactory) -> Watched:
    """The foreign loop with a Keras 3 model and optimizer, watched."""
    return watch_loop(tmp_path_factory.mktemp("foreign-keras"), keras=True)


def watch_loop(root: Path, *, keras: bool) -> Watched:
    """The foreign loop run in a subprocess while the evaluator's watch loop (--weights both) runs here."""
    args = [str(root / "run"), str(root / "validation.npz"), str(root / "train.npz"), str(root / "refs.jsonl"),
            "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), *(["--keras"] if keras else []),
            "--pace", str(root / "run" / "eval" / "results.jsonl")]  # every checkpoint read before it is deleted
    return watch_reference_loop(root, "tests.foreign_loop", args, last=f"ckpt-{STEPS}",
                                foreign=KERAS if keras else PLAIN)


@pytest.mark.parametrize("run", ["watched", "watched_keras"])
def test_every_checkpoint_matches_the_loops_own_evaluation(run: str, request: pytest.FixtureRequest) -> None:
    watched: Watched = request.getfixturevalue(run)
    records = Ledger(open_storage(watched.workdir)).read()
    assert {r["status"] for r in records} <= {"ok", "gone"}, [r.get("reason") for r in records]
    ok = {(r["checkpoint"], r["weights"]): r for r in records if r["status"] == "ok"}
    assert ("ckpt-60", "ema") in ok and ("ckpt-60", "raw") in ok
    for (name, kind), row in ok.items():
        assert row["step"] == watched.refs[name]["step"]  # the loop's `step` variable, not the name's save count
        assert row["accuracy"] == pytest.approx(watched.refs[name][kind], abs=1e-6)
    # Early on the averages lag the weights, so matching both shows each came from its own keys.
    assert any(abs(r["ema"] - r["raw"]) > 1e-6 for r in watched.refs.values())
    assert len({name for name, _ in ok}) > 2  # more were evaluated than max_to_keep=2 leaves on disk


def test_once_prints_the_mapping_table(watched: Watched, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = Path(shutil.copytree(watched.workdir, tmp_path / "run"))
    shutil.rmtree(workdir / "eval")
    code, out, err = run_evaluator_cli(["--workdir", str(workdir), *FLAGS, "--data-dir", str(watched.data),
                                        "--once", "--json", "--weights", "both"], capsys)
    assert code == 0, err
    assert "ema model/fc1/kernel" in err and "renamed from averages/fc1/kernel" in err
    assert "raw model/fc2/bias" in err and "renamed from net/fc2/bias" in err
    assert "unused saved variable: optimizer/velocity/fc1_kernel" in err
    assert err.count("restoring from") == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert {r["checkpoint"] for r in rows} == {"ckpt-50", "ckpt-60"} and {r["status"] for r in rows} == {"ok"}


@pytest.mark.parametrize(("flags", "message"), [
    (["--model", "mlp", "--dataset", "mnist"], "no moving averages for model/fc1/kernel"),
    (["--model", "mlp", "--dataset", "mnist", "--weights", "raw"], "no weights for model/fc1/kernel"),
    ([*FLAGS[:6], "--ema-map", "nothing/*=model/*"], "--ema-map nothing/*=model/*: matches no saved variable"),
    ([*FLAGS[:4], "--weights", "raw", "--restore-map", "net/*=model/x/*"], "which the model lacks"),
    ([*FLAGS[:6], "--weights", "raw", "--restore-map", "net/fc1/kernel=model/fc2/kernel"],
     "shape conflicts: net/fc1/kernel [784, 500] -> model/fc2/kernel [500, 10]"),
    (["--model", "softmax", "--dataset", "mnist", "--weights", "raw", "--restore-map", "net/fc2/*=model/fc1/*"],
     "shape conflicts"),
    (["--restore-map", "net/*=model/*"], "go with --model"),
    (["--model", "mlp"], "--model needs --dataset"),
    (["--model", "mlp", "--dataset", "mnist", "--tf1-graph"], "exclude each other"),
    (["--model", "resnet", "--dataset", "mnist"], "unknown model 'resnet'"),
    (["--model", "mlp", "--dataset", "cifar"], "unknown dataset 'cifar'"),
    ([*FLAGS[:4], "--restore-map", "net/*"], "expected OLD=NEW"),
])
def test_flags_that_do_not_fit_are_one_line_errors(watched: Watched, tmp_path: Path, flags: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    workdir = Path(shutil.copytree(watched.workdir, tmp_path / "run"))
    shutil.rmtree(workdir / "eval")
    before = listing(workdir)
    code, _, err = run_evaluator_cli(["--workdir", str(workdir), *flags, "--data-dir", str(watched.data), "--once"],
                                     capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert listing(workdir) == before


def test_our_own_runs_need_no_map(trained: Path, tiny_data: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    workdir = Path(shutil.copytree(trained, tmp_path / "run"))
    (workdir / "run.json").unlink()
    code, out, err = run_evaluator_cli(["--workdir", str(workdir), "--model", "softmax", "--dataset", "fashion-mnist",
                                        "--data-dir", str(tiny_data), "--once", "--json"], capsys)
    assert code == 0, err
    assert "restored from ema/fc1/kernel" in err and "renamed" not in err
    assert {json.loads(line)["status"] for line in out.splitlines()} == {"ok"}


def test_mirrored_over_two_devices_gives_one_devices_figures(watched: Watched, tmp_path: Path) -> None:
    rows = {}
    for name, cluster in (("one", None), ("two", Cluster(mirrored()))):
        workdir = Path(shutil.copytree(watched.workdir, tmp_path / name))
        shutil.rmtree(workdir / "eval")
        cfg = EvalConfig(workdir=workdir, data_dir=str(watched.data), weights="both", foreign=PLAIN,
                         strategy="mirrored" if cluster else "default", devices=2 if cluster else 0)
        run_once(cfg, cluster=cluster)
        rows[name] = {(r["checkpoint"], r["weights"]): r for r in Ledger(open_storage(workdir)).read()}
    assert sorted(rows["one"]) == sorted(rows["two"]) and len(rows["one"]) >= 4
    for key, one in rows["one"].items():
        two = rows["two"][key]
        assert (two["status"], two["accuracy"], two["confusion"], two["count"]) == \
            (one["status"], one["accuracy"], one["confusion"], one["count"])
        assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
