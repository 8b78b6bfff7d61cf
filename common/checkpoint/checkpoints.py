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

import contextlib
import dataclasses
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import tensorflow as tf
from google.protobuf import text_format
from tensorflow.python.training import checkpoint_state_pb2

from common.errors import ProjectError
from common.layout import CHECKPOINT_PREFIX
from common.layout import EMA_KEY as EMA_KEY
from common.layout import MODEL_KEY as MODEL_KEY
from common.layout import OPTIMIZER_KEY as OPTIMIZER_KEY
from common.layout import STEP_KEY as STEP_KEY
from common.storage import Gone, Storage, as_storage, open_storage
from common.storage.paths import BucketPath, Workdir, is_bucket

STATE_FILE = "checkpoint"
PREFIX = CHECKPOINT_PREFIX
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# What TF's checkpoint reader raises for missing, truncated or corrupt files (it maps C++ status
# codes onto several Python types: DataLossError, "Read less bytes than requested" IndexError, ...).
READ_ERRORS = (tf.errors.OpError, ValueError, IndexError, RuntimeError)
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)$")
_SAVER_STEP_RE = re.compile(r"-(\d+)$")
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
    """The step in a checkpoint name or path (`.../model-1000` -> 1000), or None."""
    match = _NAME_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def saver_step(path: str | Path) -> int | None:
    """The number after the last `-` of any checkpoint name (`.../mnist.ckpt-1001` -> 1001), or None.

    TF1's `Saver.save(..., global_step=N)` appends `-N` to whatever name it was given.
    """
    match = _SAVER_STEP_RE.search(Path(path).name)
    return int(match.group(1)) if match else None


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


def state_path(workdir: str | Workdir) -> Path:
    """Where the state file of `workdir` lies."""
    return Path(workdir) / STATE_FILE


def read_state(workdir: str | Workdir | Storage) -> State | None:
    """Parse the state file; None when there is none.

    Raises:
      CheckpointError: the file exists but cannot be parsed. Unlike `tf.train.get_checkpoint_state`,
        which logs and returns None, this never lets a broken file pass for "no checkpoint".
    """
    storage = as_storage(workdir)
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


def announce(workdir: str | Workdir | Storage, note: str) -> None:
    """Commit the state file again, unchanged but for a trailing `# note` line, so that watchers wake.

    A bucket workdir's evaluator polls the state file alone (one request per poll); the trainer
    calls this after it writes done.json there. TF's parser and ours skip the comment.
    """
    storage = as_storage(workdir)
    state = read_state(storage)
    if state is not None:
        storage.write(STATE_FILE, state_bytes(state) + f"# {' '.join(note.split())}\n".encode())


def write_state(workdir: str | Workdir | Storage, state: State) -> None:
    """Write the state file atomically (see `Storage.write`)."""
    as_storage(workdir).write(STATE_FILE, state_bytes(state))


def resolve(workdir: str | Workdir, path: str) -> Workdir:
    """Resolve a checkpoint path from the state file (relative to the workdir, as TF writes it).

    A TF1 Saver writes absolute paths: one into the workdir by another spelling (a symlink) is the
    workdir's; so is one that names no checkpoint where it points, when the workdir holds one of that
    file name (the workdir was moved). In a bucket workdir a path is relative, or a full URL.
    """
    if is_bucket(workdir):
        return BucketPath(path) if is_bucket(path) else BucketPath(str(workdir)) / path
    p = Path(path)
    named = p if p.is_absolute() else Path(workdir) / p
    if named.parent == Path(workdir):
        return named
    mine = Path(workdir) / p.name
    if os.path.realpath(named.parent) == os.path.realpath(workdir):
        return mine
    if not Path(f"{named}.index").exists() and Path(f"{mine}.index").exists():
        return mine
    return named


def inside(workdir: str | Workdir, path: str) -> bool:
    """Whether state-file path `path` names a checkpoint directly in `workdir` (no `..`, no elsewhere)."""
    if is_bucket(workdir):
        name = path[len(os.fspath(workdir)) + 1:] if path.startswith(os.fspath(workdir) + "/") else path
        return not is_bucket(name) and name not in ("", ".", "..") and "/" not in name
    root = Path(os.path.abspath(workdir))
    target = Path(os.path.normpath(resolve(root, path)))
    return target.parent == root


def key_in(workdir: Workdir, path: str) -> str | None:
    """The storage key of state-file path `path` (relative, or absolute inside `workdir`), or None if outside."""
    if is_bucket(workdir):
        return resolve(workdir, path).name if inside(workdir, path) else None
    target = os.path.normpath(resolve(workdir, path))
    relative = os.path.relpath(target, os.path.abspath(workdir))
    return None if relative == "." or relative.startswith("..") else Path(relative).as_posix()


def files_of(prefix: str | Path) -> list[Path]:
    """The files that make up checkpoint `prefix`: its `.index`, `.data-*` shards and a TF1 Saver's `.meta`."""
    prefix = Path(prefix)
    return [prefix.parent / key for key in open_storage(prefix.parent).checkpoint_files(prefix.name)]


def index_fingerprint(prefix: str | Workdir) -> str | None:
    """`<size>:<crc32>` of checkpoint `prefix`'s `.index` file, or None when it cannot be read.

    The index holds the checksum of every tensor, so it identifies a checkpoint's content: a
    checkpoint rewritten under the same name gets another fingerprint, a copied one keeps it.
    """
    if is_bucket(prefix):  # one small GET: the index only
        bucket_prefix = BucketPath(str(prefix))
        try:
            data = open_storage(bucket_prefix.parent).read(f"{bucket_prefix.name}.index")
        except OSError:
            return None
        return None if data is None else f"{len(data)}:{zlib.crc32(data):08x}"
    crc, size = 0, 0
    try:
        with open(f"{prefix}.index", "rb") as f:
            while chunk := f.read(1 << 20):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    except OSError:
        return None
    return f"{size}:{crc:08x}"


@contextlib.contextmanager
def local_copy(prefix: str | Workdir) -> Iterator[Path]:
    """A local prefix TF can read checkpoint `prefix` from: itself, or a pinned download of a bucket's.

    Raises:
      Gone: a bucket's checkpoint vanished or changed during the download (see `Storage.pin`).
    """
    if is_bucket(prefix):
        bucket_prefix = BucketPath(str(prefix))
        with open_storage(bucket_prefix.parent).pin(bucket_prefix.name) as local:
            yield local
    else:
        yield Path(prefix)


def on_disk(workdir: str | Workdir | Storage) -> list[int]:
    """Steps of the `model-<step>` checkpoints whose index file exists, ascending."""
    names = as_storage(workdir).names("", f"{PREFIX}-*.index")
    steps = (step_of(name[: -len(".index")]) for name in names)
    return sorted(s for s in steps if s is not None)


def check_readable(prefix: str | Workdir) -> str | None:
    """Why checkpoint `prefix` cannot be read (missing, truncated, corrupt), or None if it can.

    Costs one full read of the checkpoint (milliseconds for these models; a download from a bucket).
    """
    if is_bucket(prefix):
        bucket_prefix = BucketPath(str(prefix))
        try:
            if open_storage(bucket_prefix.parent).stat(f"{bucket_prefix.name}.index") is None:
                return f"{bucket_prefix.name}.index is missing"  # said as for a local disk
            with local_copy(bucket_prefix) as local:
                return check_readable(local)
        except Gone as e:
            return str(e)
        except OSError as e:
            return f"cannot download it ({e.strerror or e})"
    prefix = Path(prefix)
    index = Path(f"{prefix}.index")
    if not index.is_file():
        return f"{index.name} is missing"
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        # Reading every tensor checks each one's CRC32C and length: truncation and flipped bytes show.
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
        if not reader.has_tensor(tensor_key(STEP_KEY)):
            return f"no {STEP_KEY} in the checkpoint"
    except READ_ERRORS as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    return None


def read_step(prefix: str | Path) -> int:
    """The `global_step` stored in checkpoint `prefix`."""
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        return int(reader.get_tensor(tensor_key(STEP_KEY)))
    except READ_ERRORS as e:
        raise CheckpointError(f"{prefix}: cannot read {STEP_KEY} ({str(e).splitlines()[0]})") from e


def restore_variables(prefix: str | Path, mapping: dict[str, tf.Variable]) -> None:
    """Load checkpoint tensors into variables, by object path (see `common.model.ema.variables_to_restore`).

    Raises:
      CheckpointError: a key is missing or has another shape; the message lists every one, and
        no variable is changed.
    """
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except READ_ERRORS as e:
        raise CheckpointError(f"{prefix}: cannot open checkpoint ({str(e).splitlines()[0]})") from e
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
        raise CheckpointError(f"{prefix}: cannot read ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    for k, var in mapping.items():
        var.assign(values[k])
