"""The one locator (best, latest, step N, a prefix) and the one loader (a model with its EMA or raw weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import State
from common.errors import UsageError
from common.layout import BEST_JSON, BEST_LINK, EVAL_DIR
from common.run.loader import load_model
from common.run.locate import BEST, BEST_ELSE_LATEST, LATEST, NoBest, NoCheckpoint, Unreadable, locate
from common.run.spec import read_run
from common.storage import open_storage


def save(prefix: Path, step: int) -> None:
    """A checkpoint holding only `global_step`: all the locator looks at."""
    tf.train.Checkpoint(global_step=tf.Variable(step, dtype=tf.int64)).write(str(prefix))


def keep_best(workdir: Path, step: int) -> Path:
    """Lay out eval/best and eval/best.json as the evaluator does, holding checkpoint `step`."""
    name = checkpoints.name_for(step)
    save(workdir / EVAL_DIR / BEST_LINK / name, step)
    (workdir / EVAL_DIR / BEST_JSON).write_text(json.dumps({"checkpoint": name, "step": step}))
    return workdir / EVAL_DIR / BEST_LINK / name


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A workdir with model-20, -40 and -60, the state file naming model-60, and no best yet."""
    names = [checkpoints.name_for(step) for step in (20, 40, 60)]
    for step, name in zip((20, 40, 60), names, strict=True):
        save(tmp_path / name, step)
    checkpoints.write_state(open_storage(tmp_path), State(latest=names[-1], paths=names))
    return tmp_path


def test_names_in_a_workdir(run: Path) -> None:
    assert locate(run, LATEST).prefix == run / "model-60"
    assert locate(run, 20).prefix == run / "model-20"
    assert locate(run, BEST_ELSE_LATEST).prefix == run / "model-60"  # no best yet
    best = keep_best(run, 40)
    assert locate(run, BEST).prefix == best
    assert locate(run).prefix == best  # BEST_ELSE_LATEST is the default
    assert locate(run, LATEST).prefix == run / "model-60"


def test_a_prefix_is_taken_as_it_is(run: Path) -> None:
    assert locate(run / "model-40").prefix == run / "model-40"
    with pytest.raises(Unreadable, match=r"model-30\.index is missing"):
        locate(run / "model-30")


@pytest.mark.parametrize(("which", "error", "message"), [
    (LATEST, NoCheckpoint, "no checkpoint (no state file)"),
    (BEST_ELSE_LATEST, NoCheckpoint, "no checkpoint (no state file)"),
    (BEST, NoBest, "no best checkpoint yet"),
    (20, Unreadable, "model-20.index is missing"),
])
def test_an_empty_workdir_is_a_one_line_usage_error(tmp_path: Path, which: str | int, error: type,
                                                     message: str) -> None:
    with pytest.raises(error) as caught:
        locate(tmp_path, which)
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == 2
    assert caught.value.why == message and "\n" not in str(caught.value)


def test_a_damaged_checkpoint_is_unreadable_unless_the_check_is_skipped(run: Path) -> None:
    data = next(run.glob("model-40.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(Unreadable) as caught:
        locate(run, 40)
    assert caught.value.source == run / "model-40"
    assert locate(run, 40, check=False).prefix == run / "model-40"


def test_an_unknown_name_is_a_programming_error(run: Path) -> None:
    with pytest.raises(ValueError, match="'newest'"):
        locate(run, "newest")


def test_load_model_restores_the_weights_asked_for(trained: Path) -> None:
    spec = read_run(open_storage(trained))
    assert spec is not None
    prefix = locate(trained, LATEST)
    reader = tf.train.load_checkpoint(str(prefix))
    differ = False
    for weights, key in (("ema", checkpoints.EMA_KEY), ("raw", checkpoints.MODEL_KEY)):
        model = load_model(spec, prefix, weights)
        for path, var in model.named_variables().items():
            saved = reader.get_tensor(checkpoints.tensor_key(f"{key}/{path}"))
            np.testing.assert_array_equal(var.numpy(), saved)
            raw = reader.get_tensor(checkpoints.tensor_key(f"{checkpoints.MODEL_KEY}/{path}"))
            differ = differ or not np.array_equal(saved, raw)
    assert differ, "after 60 steps the moving averages should differ from the weights"
    with pytest.raises(ValueError, match="'best'"):
        load_model(spec, prefix, "best")
