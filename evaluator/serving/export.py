"""`evaluator export`: a SavedModel (and optionally a frozen GraphDef) with the chosen weights baked in.

The export needs nothing of this project to be used: `tf.saved_model.load`, `saved_model_cli`
and `tf.compat.v1` `import_graph_def` read it. Class names travel inside, as a constant output
and as the asset `labels.txt`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from common.checkpoint import checkpoints
from common.errors import UsageError, WorkdirIOError
from common.layout import RUN_FILE
from common.model import models
from common.run.loader import load_model
from common.run.locate import BEST, LATEST, Located, NoBest, Unreadable, locate
from common.run.spec import RunSpec, read_run, run_file_bytes
from common.run.workdir import Workdir
from common.storage import Gone
from common.storage.fileio import atomic_write_bytes, atomic_write_json
from common.storage.paths import absolute, remove

FROZEN_FILE = "frozen_graph.pb"
LABELS_FILE = "labels.txt"
# Written into every export: only a folder holding it (or, for exports made before it existed,
# nothing but an export's own files) is ever replaced by a new export.
MARKER_FILE = "export.json"
_EXPORT_NAMES = frozenset({"saved_model.pb", "fingerprint.pb", "variables", "assets", LABELS_FILE, RUN_FILE,
                           FROZEN_FILE, MARKER_FILE})
FROZEN_INPUT = "images"  # the dataset's stored images: uint8 [N, 28, 28] for MNIST
FROZEN_OUTPUTS = ("probabilities", "classes")


def resolve(workdir: Workdir, step: str) -> Located:
    """The checkpoint that `--step N|best|latest` names in `workdir`."""
    if not (step.isdigit() or step in (BEST, LATEST)):
        raise UsageError(f"--step ({step!r}) must be a step number, 'best' or 'latest'")
    try:
        return locate(workdir, int(step) if step.isdigit() else step)
    except NoBest:
        raise UsageError(f"{workdir}: no best checkpoint yet (run the evaluator first, or use --step latest)") from None
    except Unreadable as e:
        raise UsageError(f"{e.source.name}: cannot be exported ({e.why})") from None


class Exported(tf.Module):
    """What the SavedModel holds: the model, its class names and two signatures.

    `serve_images` takes images as the dataset stores them (`[N, *InputSpec.stored_shape]`, e.g.
    uint8 [N, 28, 28]) and applies the run's preprocessing; `serve_bytes` takes encoded files.
    """

    def __init__(self, model: models.Classifier, spec: RunSpec, labels_path: str) -> None:
        super().__init__(name="exported")
        self.model = model
        self.class_names = tf.constant(list(spec.class_names))
        self.labels = tf.saved_model.Asset(labels_path)
        self._spec = spec
        stored = tf.TensorSpec([None, *spec.input.stored_shape], tf.as_dtype(spec.input.dtype), name="images")
        self.serve_images = tf.function(self._outputs, input_signature=[stored])
        self.serve_bytes = tf.function(self._decode_and_serve,
                                       input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])

    def _outputs(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.nn.softmax(self.model(self._spec.prepare(images)))
        classes = tf.argmax(probabilities, axis=1)
        return {"probabilities": probabilities, "classes": classes,
                "class_names": tf.gather(self.class_names, classes)}

    def _decode_and_serve(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        """Encoded PNG/JPEG/BMP/GIF files, decoded to the dataset's channels and size (no inversion)."""
        spec = self._spec.input

        def decode(data: tf.Tensor) -> tf.Tensor:
            image = tf.io.decode_image(data, channels=spec.channels, expand_animations=False)
            image = tf.image.resize(image, [spec.height, spec.width], antialias=True)
            image = tf.reshape(image, spec.stored_shape)
            return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.as_dtype(spec.dtype))

        stored = tf.TensorSpec(spec.stored_shape, tf.as_dtype(spec.dtype))
        return self._outputs(tf.map_fn(decode, image_bytes, fn_output_signature=stored))


def export(workdir: Workdir, *, step: str = "best", weights: str = "ema", out: Path | None = None,
           frozen: bool = False) -> Path:
    """Write the export atomically (a temp folder renamed into place) and return its path."""
    spec = read_run(workdir.storage)
    if spec is None:
        raise UsageError(f"{workdir}: no run.json (not a trainer workdir)")
    if weights not in ("ema", "raw"):
        raise UsageError(f"--weights ({weights!r}) must be ema or raw")
    local = workdir.local_folder()
    if out is None and local is None:
        raise UsageError(f"--workdir {workdir}: give --out, a local folder for the export")
    located = resolve(workdir, step)
    try:
        with located.readable() as prefix:  # a bucket's: downloaded, and removed after the load
            number = checkpoints.read_step(prefix)
            target = Path(os.path.abspath(out if out is not None else Path(local or "") / "export" / str(number)))
            check_target(target)
            model = load_model(spec, prefix, weights)
    except Gone as e:
        raise UsageError(f"{located.name}: cannot be exported ({e})") from None

    def fill(tmp: Path) -> None:
        labels = write_labels(tmp, spec.class_names)
        # The run's settings travel too: predict reads the dataset from them.
        atomic_write_bytes(tmp / RUN_FILE, run_file_bytes(spec))
        module = Exported(model, spec, str(labels))
        save_into(tmp, lambda saved: tf.saved_model.save(module, saved, signatures={
            "serving_default": module.serve_images, "predict_image_bytes": module.serve_bytes}))
        if frozen:
            (tmp / FROZEN_FILE).write_bytes(freeze(module, spec).SerializeToString())
        write_marker(tmp, workdir, located.name, number, weights)

    write_folder(target, fill)
    return target


def write_folder(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temp folder beside `target`, then move it into place (an earlier export there is replaced).

    Raises:
      WorkdirIOError: the export cannot be written; nothing is left behind.
    """
    tmp = _make_temp(target)
    try:
        fill(tmp)
        _replace(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WorkdirIOError(f"--out {target}: cannot write the export ({e.strerror or e})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_into(folder: Path, save: Callable[[str], None]) -> None:
    """Let `save` write a SavedModel into a new path, then move its files into `folder` (the export itself)."""
    saved = folder / "saved"
    save(str(saved))
    for path in saved.iterdir():
        os.rename(path, folder / path.name)
    saved.rmdir()


def write_labels(folder: Path, class_names: tuple[str, ...]) -> Path:
    """`labels.txt`: line i names class i."""
    labels = folder / LABELS_FILE
    labels.write_text("".join(f"{name}\n" for name in class_names))
    return labels


def write_marker(folder: Path, workdir: Workdir, checkpoint: str, step: int | None, weights: str,
                 **extra: str) -> None:
    """`export.json`: what was exported, from where (and it marks the folder as an export)."""
    atomic_write_json(folder / MARKER_FILE, {"checkpoint": checkpoint, "step": step, "weights": weights,
                                             "workdir": absolute(workdir.location), **extra})


def is_export(folder: Path) -> bool:
    """Whether `folder` is an earlier export: it holds the marker, or only an export's own files."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    if (folder / MARKER_FILE).is_file():
        return True
    names = {p.name for p in folder.iterdir()}
    return "saved_model.pb" in names and names <= _EXPORT_NAMES


def check_target(target: Path) -> None:
    """Refuse an `--out` that exists and is not an earlier export; nothing is changed.

    Raises:
      UsageError: the target is a file, a link, or a folder that an export did not write.
    """
    if not (target.exists() or target.is_symlink()):
        return
    if not is_export(target):
        kind = "a link" if target.is_symlink() else "a folder" if target.is_dir() else "a file"
        raise UsageError(f"--out {target}: {kind} that is not an earlier export already exists there; "
                         "choose a new path (only an earlier export is ever replaced)")


def _make_temp(target: Path) -> Path:
    """A temp folder beside `target` with the umask's permissions (mkdtemp makes it 0700)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise UsageError(f"--out {target}: cannot write there ({e.strerror or e})") from e
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)
    return tmp


def _replace(tmp: Path, target: Path) -> None:
    """Move `tmp` to `target`; an earlier export there is moved aside first and removed after."""
    old = None
    if target.exists():
        check_target(target)  # again: something may have appeared there while the model was written
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(3)}")
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        remove(old, target.parent)


def freeze(module: Exported, spec: RunSpec) -> tf.compat.v1.GraphDef:
    """One GraphDef with the weights as constants: input `images:0`, outputs `probabilities:0`, `classes:0`."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = module.serve_images.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    inner = frozen.graph.as_graph_def()
    # The frozen function's outputs are the signature's dict flattened, i.e. in sorted key order.
    by_key = dict(zip(sorted(concrete.structured_outputs), frozen.outputs, strict=True))
    names = [by_key[k].name for k in FROZEN_OUTPUTS]
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.as_dtype(spec.input.dtype), [None, *spec.input.stored_shape],
                                          name=FROZEN_INPUT)
        results = tf.graph_util.import_graph_def(inner, input_map={frozen.inputs[0].name: images},
                                                 return_elements=names, name="model")
        for name, tensor in zip(FROZEN_OUTPUTS, results, strict=True):
            tf.identity(tensor, name=name)
    return graph.as_graph_def()

