from __future__ import annotations

from pathlib import Path

import pytest
import tensorflow as tf

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import CheckpointError, State
from common.storage import open_storage
from trainer.saver import select_kept


def test_state_file_is_read_by_tensorflow(tmp_path: Path) -> None:
    state = State(latest="model-20", paths=["model-10", "model-20"], timestamps=[1.0, 2.0],
                  last_preserved_timestamp=0.5)
    checkpoints.write_state(open_storage(tmp_path), state)
    tf_state = tf.train.get_checkpoint_state(str(tmp_path))
    assert tf_state.model_checkpoint_path == str(tmp_path / "model-20")
    assert list(tf_state.all_model_checkpoint_paths) == [str(tmp_path / "model-10"), str(tmp_path / "model-20")]
    assert checkpoints.read_state(open_storage(tmp_path)) == state
    assert not list(tmp_path.glob("*.tmp-*"))


def test_missing_and_corrupt_state(tmp_path: Path) -> None:
    assert checkpoints.read_state(open_storage(tmp_path)) is None
    (tmp_path / "checkpoint").write_text("model_checkpoint_path: \"model-1\nall_model")
    with pytest.raises(CheckpointError, match="checkpoint: corrupt state file"):
        checkpoints.read_state(open_storage(tmp_path))
    (tmp_path / "checkpoint").write_text("")
    with pytest.raises(CheckpointError, match="names no model_checkpoint_path"):
        checkpoints.read_state(open_storage(tmp_path))


def test_names() -> None:
    assert checkpoints.name_for(1000) == "model-1000"
    assert checkpoints.step_of("/x/model-1000") == 1000
    assert checkpoints.step_of("model-1000.index") is None
    assert checkpoints.step_of("other-3") is None


def test_check_readable(tmp_path: Path) -> None:
    step = tf.Variable(7, dtype=tf.int64)
    prefix = tf.train.Checkpoint(global_step=step, w=tf.Variable(tf.ones([1000]))).write(str(tmp_path / "model-7"))
    assert checkpoints.check_readable_files(prefix) is None
    assert checkpoints.read_step(prefix) == 7
    data = next(tmp_path.glob("model-7.data-*"))
    data.write_bytes(data.read_bytes()[:100])
    assert checkpoints.check_readable_files(prefix) is not None
    assert checkpoints.check_readable_files(tmp_path / "model-8") == "model-8.index is missing"


def test_retention_keeps_newest() -> None:
    entries = [(f"model-{i}", float(i)) for i in range(1, 8)]
    kept, _ = select_kept(entries, keep=3, keep_every_hours=0, anchor=0)
    assert [p for p, _ in kept] == ["model-5", "model-6", "model-7"]
    kept, _ = select_kept(entries, keep=0, keep_every_hours=0, anchor=0)
    assert len(kept) == 7


def test_retention_keeps_one_per_interval_and_is_stable() -> None:
    hour = 3600.0
    entries = [(f"model-{i}", i * 0.5 * hour) for i in range(1, 11)]  # one every 30 minutes
    kept, last = select_kept(entries, keep=2, keep_every_hours=1, anchor=0)
    assert [p for p, _ in kept] == ["model-2", "model-4", "model-6", "model-8", "model-9", "model-10"]
    assert last == 4 * hour
    # Once chosen, an old checkpoint stays chosen as more are added.
    more, _ = select_kept([*kept, ("model-11", 5.5 * hour)], keep=2, keep_every_hours=1, anchor=0)
    assert [p for p, _ in more][:4] == ["model-2", "model-4", "model-6", "model-8"]


def test_retention_orders_by_save_time_not_step() -> None:
    # After resuming from model-20, the stale model-30 (older in time) goes first.
    entries = [("model-20", 1.0), ("model-30", 2.0), ("model-25", 3.0), ("model-28", 4.0)]
    kept, _ = select_kept(entries, keep=2, keep_every_hours=0, anchor=0)
    assert [p for p, _ in kept] == ["model-25", "model-28"]


def test_retention_never_drops_protected() -> None:
    entries = [(f"model-{i}", float(i)) for i in range(1, 8)]
    kept, _ = select_kept(entries, keep=2, keep_every_hours=0, anchor=0, protected=frozenset({"model-3"}))
    assert [p for p, _ in kept] == ["model-3", "model-6", "model-7"]
