"""The checkpoint layout both programs agree on, and TF's `checkpoint` state file.

A workdir holds `model-<step>.index` + `model-<step>.data-*` per checkpoint and the state file
`checkpoint` (a text `CheckpointState` proto, the format `tf.train.get_checkpoint_state` reads).
Its first line, `model_checkpoint_path`, names the checkpoint to restore.

Inside a checkpoint, object paths are:
  global_step                 the training step (int64)
  model/<layer>/<kernel|bias> the raw weights
  ema/<layer>/<kernel|bias>   their exponential moving averages
  optimizer/...               optimizer slots
TF appends `/.ATTRIBUTES/VARIABLE_VALUE` to each path to form the tensor key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from pathlib import Path
from typing import Any

import tensorflow as tf
from google.protobuf import text_format
from tensorflow.python.training import checkpoint_state_pb2

from common.errors import ProjectError
from common.layout import CHECKPOINT_PREFIX, STATE_FILE
from common.layout import EMA_KEY as EMA_KEY
from common.layout import MODEL_KEY as MODEL_KEY
from common.layout import OPTIMIZER_KEY as OPTIMIZER_KEY
from common.layout import STEP_KEY as STEP_KEY
from common.storage import Gone, Storage
from common.storage.paths import Location

PREFIX = CHECKPOINT_PREFIX
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# What TF's checkpoint reader raises for missing, truncated or corrupt files (it maps C++ status
# codes onto several Python types: DataLossError, "Read less bytes than requested" IndexError, ...).
READ_ERRORS = (tf.errors.OpError, ValueError, IndexError, RuntimeError)
# The one parser of checkpoint names: `<base>-<step>` (TF1's `Saver.save(..., global_step=N)` appends `-N`).
_NAMED_STEP = re.compile(r"^(?P<base>.*)-(?P<step>\d+)$")
# A state file that TF or this trainer writes stays far below these (about 60 bytes per entry);
# anything larger is refused before it is parsed, so a hostile file cannot exhaust memory.
MAX_STATE_BYTES = 16 * 2**20
MAX_STATE_ENTRIES = 100_000


class CheckpointError(ProjectError):
    """A checkpoint or state file cannot be used; the message says which and why."""

    exit_code = 2


def name_for(step: int) -> str:
    """The checkpoint name for `step` (`model-1000`)."""
    return f"{PREFIX}-{step}"


def step_of(path: str | Path) -> int | None:
    """The step in one of this trainer's checkpoint names or paths (`.../model-1000` -> 1000), or None."""
    match = _NAMED_STEP.match(Path(path).name)
    return int(match["step"]) if match and match["base"] == PREFIX else None


def saver_step(path: str | Path) -> int | None:
    """The number after the last `-` of any checkpoint name (`.../mnist.ckpt-1001` -> 1001), or None.

    TF1's `Saver.save(..., global_step=N)` appends `-N` to whatever name it was given.
    """
    match = _NAMED_STEP.match(Path(path).name)
    return int(match["step"]) if match else None


def tensor_key(path: str) -> str:
    """The tensor key TF stores for object path `path` (`ema/conv1/kernel`)."""
    return path + VALUE_SUFFIX


@dataclasses.dataclass
class State:
    """What the state file says: the checkpoint to restore and every one kept, oldest first."""

    latest: str | None = None
    paths: list[str] = dataclasses.field(default_factory=list)
    timestamps: list[float] = dataclasses.field(default_factory=list)
    last_preserved_timestamp: float = 0.0

    def timestamps_by_path(self) -> dict[str, float]:
        """Every path's recorded save time (the first, if listed twice); empty when they do not pair up."""
        if len(self.timestamps) != len(self.paths):
            return {}
        return dict(zip(reversed(self.paths), reversed(self.timestamps), strict=True))


def read_state(storage: Storage) -> State | None:
    """Parse the state file; None when there is none.

    Raises:
      CheckpointError: the file exists but cannot be parsed. Unlike `tf.train.get_checkpoint_state`,
        which logs and returns None, this never lets a broken file pass for "no checkpoint".
    """
    path = storage.describe(STATE_FILE)
    try:
        data = storage.read(STATE_FILE, limit=MAX_STATE_BYTES + 1)
        if data is None:
            return None
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable state file ({e})") from e
    if len(data) > MAX_STATE_BYTES:
        raise CheckpointError(f"{path}: state file larger than {MAX_STATE_BYTES:,} bytes; refusing to read it")
    proto = checkpoint_state_pb2.CheckpointState()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as e:
        raise CheckpointError(f"{path}: corrupt state file ({e})") from e
    if not proto.model_checkpoint_path:
        raise CheckpointError(f"{path}: state file names no model_checkpoint_path")
    if len(proto.all_model_checkpoint_paths) > MAX_STATE_ENTRIES:
        raise CheckpointError(f"{path}: state file lists {len(proto.all_model_checkpoint_paths)} checkpoints "
                              f"(more than {MAX_STATE_ENTRIES}); refusing to use it")
    return State(
        latest=proto.model_checkpoint_path,
        paths=list(proto.all_model_checkpoint_paths),
        timestamps=list(proto.all_model_checkpoint_timestamps),
        last_preserved_timestamp=proto.last_preserved_timestamp,
    )


def state_bytes(state: State) -> bytes:
    """The state file's content for `state` (a text `CheckpointState` proto)."""
    proto = checkpoint_state_pb2.CheckpointState(
        model_checkpoint_path=state.latest or "",
        all_model_checkpoint_paths=state.paths,
        all_model_checkpoint_timestamps=state.timestamps,
        last_preserved_timestamp=state.last_preserved_timestamp,
    )
    return text_format.MessageToString(proto).encode("utf-8")


def announce(storage: Storage, note: str) -> None:
    """Commit the state file again, unchanged but for a trailing `# note` line, so that watchers wake.

    A watcher of a storage that `polls_state_file_only` (a bucket) sees no other file change; the
    trainer calls this after it writes done.json. Elsewhere it does nothing. TF's parser and ours
    skip the comment.
    """
    if not storage.polls_state_file_only:
        return
    state = read_state(storage)
    if state is not None:
        storage.write(STATE_FILE, state_bytes(state) + f"# {' '.join(note.split())}\n".encode())


def write_state(storage: Storage, state: State) -> None:
    """Write the state file atomically (see `Storage.write`)."""
    storage.write(STATE_FILE, state_bytes(state))


def resolve(storage: Storage, path: str) -> Location:
    """Where a checkpoint path from the state file points: in the workdir (see `Storage.key_of`), or as written."""
    key = storage.key_of(path)
    return storage.location(key) if key is not None else Path(path)


def inside(storage: Storage, path: str) -> bool:
    """Whether state-file path `path` names a checkpoint directly in the workdir (no `..`, no elsewhere)."""
    key = storage.key_of(path)
    return key is not None and "/" not in key


def index_fingerprint(storage: Storage, name: str) -> str | None:
    """`<size>:<crc32>` of checkpoint `name`'s `.index` file, or None when it cannot be read.

    The index holds the checksum of every tensor, so it identifies a checkpoint's content: a
    checkpoint rewritten under the same name gets another fingerprint, a copied one keeps it.
    One small read (a GET in a bucket): the index only.
    """
    try:
        data = storage.read(f"{name}.index")
    except OSError:
        return None
    return None if data is None else f"{len(data)}:{zlib.crc32(data):08x}"


def file_fingerprint(prefix: Path) -> str | None:
    """`index_fingerprint` of checkpoint files on a local disk (a pinned copy), read in chunks."""
    crc, size = 0, 0
    try:
        with open(f"{prefix}.index", "rb") as f:
            while chunk := f.read(1 << 20):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    except OSError:
        return None
    return f"{size}:{crc:08x}"


def on_disk(storage: Storage) -> list[int]:
    """Steps of the `model-<step>` checkpoints whose index file exists, ascending."""
    names = storage.names("", f"{PREFIX}-*.index")
    steps = (step_of(name[: -len(".index")]) for name in names)
    return sorted(s for s in steps if s is not None)


def check_readable(storage: Storage, name: str) -> str | None:
    """Why checkpoint `name` cannot be read (missing, truncated, corrupt), or None if it can.

    Costs one full read of the checkpoint (milliseconds for these models; a download from a bucket).
    """
    try:
        if storage.stat(f"{name}.index") is None:
            return f"{name.rpartition('/')[2]}.index is missing"
        with storage.readable(name) as local:
            return check_readable_files(local)
    except Gone as e:
        return str(e)
    except OSError as e:
        return f"cannot download it ({e.strerror or e})"


def check_readable_files(prefix: Path) -> str | None:
    """`check_readable` for checkpoint files TF can open where they are."""
    if not Path(f"{prefix}.index").is_file():
        return f"{prefix.name}.index is missing"
    try:
        reader = open_reader(prefix)
        # Reading every tensor checks each one's CRC32C and length: truncation and flipped bytes show.
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
        if not reader.has_tensor(tensor_key(STEP_KEY)):
            return f"no {STEP_KEY} in the checkpoint"
    except UnreadableCheckpoint as e:
        return e.why
    except READ_ERRORS as e:
        return describe_read_error(e)
    return None


def describe_read_error(error: BaseException) -> str:
    """One line for an error of TF's checkpoint reader: its type and the first line of its message."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"


class UnreadableCheckpoint(CheckpointError):
    """TF's reader cannot open a checkpoint; `why` is `describe_read_error`'s line."""

    def __init__(self, prefix: str | os.PathLike[str], why: str) -> None:
        super().__init__(f"{prefix}: cannot open checkpoint ({why})")
        self.why = why


def open_reader(prefix: str | os.PathLike[str]) -> Any:
    """TF's `CheckpointReader` for `prefix`: the one call of `tf.train.load_checkpoint`, with one error mapping.

    Raises:
      UnreadableCheckpoint: missing, truncated or corrupt files, whatever Python type TF raised.
    """
    try:
        return tf.train.load_checkpoint(os.fspath(prefix))
    except READ_ERRORS as e:
        raise UnreadableCheckpoint(prefix, describe_read_error(e)) from e


def read_step(prefix: str | Path) -> int:
    """The `global_step` stored in checkpoint `prefix`."""
    reader = open_reader(prefix)
    try:
        return int(reader.get_tensor(tensor_key(STEP_KEY)))
    except READ_ERRORS as e:
        raise CheckpointError(f"{prefix}: cannot read {STEP_KEY} ({str(e).splitlines()[0]})") from e


def restore_variables(prefix: str | Path, mapping: dict[str, tf.Variable]) -> None:
    """Load checkpoint tensors into variables, by object path (see `common.model.ema.variables_to_restore`).

    Raises:
      CheckpointError: a key is missing or has another shape; the message lists every one, and
        no variable is changed.
    """
    reader = open_reader(prefix)
    shapes = reader.get_variable_to_shape_map()
    missing = [k for k in mapping if tensor_key(k) not in shapes]
    if missing:
        raise CheckpointError(f"{prefix}: no {', '.join(missing)} in the checkpoint")
    wrong = [
        f"{k} {shapes[tensor_key(k)]} != {v.shape.as_list()}"
        for k, v in mapping.items()
        if list(shapes[tensor_key(k)]) != v.shape.as_list()
    ]
    if wrong:
        raise CheckpointError(f"{prefix}: shape mismatch: {'; '.join(wrong)}")
    try:
        values = {k: reader.get_tensor(tensor_key(k)) for k in mapping}
    except READ_ERRORS as e:
        raise CheckpointError(f"{prefix}: cannot read ({describe_read_error(e)})") from e
    for k, var in mapping.items():
        var.assign(values[k])
