"""A point-in-time copy of everything a `tf.train.Checkpoint` saves, written later by another thread.

`take` runs on the training thread. It gathers the checkpoint's tensors the way
`tf.train.Checkpoint.write` does (same keys, same object graph) and reads each variable now: on
an accelerator that read is the device-to-host copy; on the CPU it shares the variable's buffer,
and TensorFlow copies that buffer before the next in-place update (a variable's update kernels
copy a buffer that is still referenced), so the values stay those of the step saved. `write`
runs on the writer thread and writes those values with TensorFlow's own saver, so a checkpoint
written from a snapshot reads exactly like one written synchronously.

TensorFlow's own `CheckpointOptions(enable_async=True)` is not used: it surfaces a failed
background write only at the next write or in an `atexit` hook (where it cannot set our exit
code), its `sync()` does not raise it, and a trackable without `_copy_trackable_to_cpu` is skipped
with a log warning, so the live, still-changing variable would be written instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import tensorflow as tf
from tensorflow.python.checkpoint import functional_saver
from tensorflow.python.training.saving import saveable_object
from tensorflow.python.util import object_identity


class SnapshotError(Exception):
    """The checkpoint holds state that cannot be copied for a background write."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The tensors of one save, by trackable and checkpoint key, as `MultiDeviceSaver` takes them."""

    tensors: Mapping[Any, dict[str, Any]]  # by trackable (an identity map), then by checkpoint key

    def keys(self) -> list[str]:
        """The checkpoint keys the snapshot holds (the object graph's key among them)."""
        return sorted(key for by_key in self.tensors.values() for key in by_key)

    def write(self, prefix: str) -> None:
        """Write the snapshot as a checkpoint at `prefix` (TF stages it in `<prefix>_temp/`, like `write`)."""
        functional_saver.MultiDeviceSaver(self.tensors).save(tf.constant(prefix))


def take(checkpoint: tf.train.Checkpoint) -> Snapshot:
    """Read every value `checkpoint.write` would save, now.

    Raises:
      SnapshotError: the checkpoint has state that TensorFlow saves through a registered saver,
        which writes live state at write time and so cannot be snapshotted.
    """
    # The same gathering `tf.train.Checkpoint.write` does (TrackableSaver), with the object graph proto.
    tensors, _, registered, _ = checkpoint._saver._gather_serialized_tensors(None)
    if registered:
        raise SnapshotError(f"state saved by registered savers ({', '.join(map(str, registered))}) cannot be "
                            "copied for a background write; use --save-mode sync")
    read = object_identity.ObjectIdentityDictionary()  # trackables (variables among them) are not hashable
    for obj, by_key in tensors.items():
        read[obj] = {key: _read(value) for key, value in by_key.items()}
    return Snapshot(read)


def _read(value: Any) -> Any:
    """Resolve a value to save into a tensor now: a `SaveSpec` (a variable's deferred read) is read here."""
    if isinstance(value, dict):  # slice spec -> value
        return {spec: _read(v) for spec, v in value.items()}
    if isinstance(value, saveable_object.SaveSpec):
        tensor = value.tensor  # calls the variable's read: identity on the host CPU
        if tensor is None:
            raise SnapshotError(f"{value.name}: an uninitialised variable cannot be saved")
        return tensor
    return value
