"""TF1 `tf.train.Saver` checkpoints, used with no model code: the meta graph, its moving averages, images fed to it.

A Saver checkpoint `<name>-<step>` holds `.index`, `.data-*` and the `.meta` graph it was saved from.
`SaverGraph` imports that graph into a private `tf.Graph` with its own `tf.compat.v1.Session`,
finds the input and output tensors by name, and restores the EMA shadows
(`<variable>/ExponentialMovingAverage`, the tutorials' `variables_to_restore()`) or the raw variables.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import READ_ERRORS, CheckpointError
from common.data import datasets
from common.data.inputspec import InputSpec
from common.errors import UsageError
from common.layout import META_SUFFIX

EMA_SUFFIX = "/ExponentialMovingAverage"  # where tf.train.ExponentialMovingAverage saves its shadows
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"  # in every TF2 object-based checkpoint, in no Saver one
STEP_VARIABLE = "global_step"
BATCH_SIZE = 1000
# Without --dataset (an export), the graph is taken to be fed as the tutorials fed theirs: MNIST's images.
TUTORIAL_DATASET = "mnist"


def image_shapes(spec: InputSpec) -> tuple[tuple[int, ...], ...]:
    """Shapes (after the batch dimension) that hold one image: flat, plain (one channel), channels last or first."""
    flat = (spec.height * spec.width * spec.channels,)
    plain = ((spec.height, spec.width),) if spec.channels == 1 else ()
    return (flat, *plain, spec.shape, (spec.channels, spec.height, spec.width))


@dataclasses.dataclass(frozen=True)
class GraphFlags:
    """What `--tf1-graph` runs need from the flags, since their workdir has no run.json."""

    input: str  # the images' tensor, e.g. x-input:0 (an op name means its first output)
    output: str  # the logits' (or probabilities') tensor, e.g. layer2/add:0
    dataset: str | None  # the images fed and the class names; None: export only, classes by number

    def __post_init__(self) -> None:
        for flag, value in (("--input", self.input), ("--output", self.output)):
            if not value or not value.strip():
                raise UsageError(f"--tf1-graph needs {flag} (a tensor name such as x-input:0)")
        if self.dataset is not None:
            datasets.get_info(self.dataset)

    @property
    def info(self) -> datasets.DatasetInfo:
        """The dataset whose images the graph is fed (the tutorials' MNIST without --dataset)."""
        return datasets.get_info(self.dataset or TUTORIAL_DATASET)

    def class_names(self) -> tuple[str, ...]:
        """The dataset's class names, or their numbers without a dataset."""
        names = self.info.class_names
        return names if self.dataset is not None else tuple(str(i) for i in range(len(names)))


class GraphFlagError(UsageError):
    """The flags do not fit the graph: a tensor that is not there, or one of the wrong shape."""


def saver_format(prefix: str | Path) -> str | None:
    """`"tf1"` for a name-based Saver checkpoint, `"tf2"` for an object-based one, None when unreadable."""
    try:
        keys = checkpoints.open_reader(prefix).get_variable_to_shape_map()
    except READ_ERRORS:
        return None
    return "tf2" if OBJECT_GRAPH_KEY in keys else "tf1"


def read_saver_step(prefix: str | Path, name: str | None = None) -> int | None:
    """The step of Saver checkpoint `prefix`: the number after the last `-` of `name` (default: the prefix's).

    Raises:
      CheckpointError: the checkpoint's `global_step` disagrees with its name, or it cannot be read.
    """
    name = name or Path(prefix).name
    named = checkpoints.saver_step(name)
    try:
        reader = checkpoints.open_reader(prefix)
        stored = int(reader.get_tensor(STEP_VARIABLE)) if reader.has_tensor(STEP_VARIABLE) else None
    except READ_ERRORS as e:
        raise CheckpointError(f"{name}: cannot read ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if named is not None and stored is not None and named != stored:
        raise CheckpointError(f"{name}: the name says step {named} but its {STEP_VARIABLE} is {stored}")
    return named if named is not None else stored


def _tensor(graph: tf.Graph, name: str, flag: str, meta: Path) -> tf.Tensor:
    """The tensor `name` (`op:0`, or an op's first output) of `graph`, or a GraphFlagError naming the closest."""
    full = name if ":" in name else f"{name}:0"
    try:
        return graph.get_tensor_by_name(full)
    except (KeyError, ValueError):
        names = [t.name for op in graph.get_operations() for t in op.outputs]
        close = difflib.get_close_matches(full, names, n=5, cutoff=0.4)
        hint = f"closest: {', '.join(close)}" if close else f"it has {len(names)} tensors, none alike"
        raise GraphFlagError(f"{flag} {name}: no such tensor in the graph of {meta.name} ({hint})") from None


def _image_shape(tensor: tf.Tensor, spec: InputSpec, meta: Path) -> tuple[int | None, tuple[int, ...]]:
    """The input's fixed batch size (None when any) and the shape of one image in it."""
    dims = tensor.shape.as_list() if tensor.shape.rank is not None else None
    shapes = image_shapes(spec)
    if dims is None or len(dims) < 2 or tuple(dims[1:]) not in shapes or not tensor.dtype.is_floating:
        accepted = " or ".join(f"[N, {', '.join(map(str, s))}]" for s in shapes)
        raise GraphFlagError(
            f"--input {tensor.name} is {tensor.dtype.name} of shape {tensor.shape} in {meta.name}: it cannot take "
            f"{spec.height}x{spec.width}x{spec.channels} images (float {accepted})")
    return dims[0], tuple(dims[1:])


def _check_output(tensor: tf.Tensor, num_classes: int, meta: Path) -> None:
    dims = tensor.shape.as_list() if tensor.shape.rank is not None else None
    if dims is not None and (len(dims) != 2 or dims[-1] not in (None, num_classes)):
        raise GraphFlagError(f"--output {tensor.name} has shape {tensor.shape} in {meta.name}; expected "
                             f"[N, {num_classes}], one score per class of the dataset")


class SaverGraph:
    """The meta graph of one Saver checkpoint in a private graph and session, ready to restore and run."""

    def __init__(self, meta: Path, flags: GraphFlags) -> None:
        """Import `meta` (a `.meta` file) and find the flags' tensors in it.

        Raises:
          CheckpointError: the file is missing or not a meta graph.
          GraphFlagError: a tensor is not in the graph, or its shape does not fit the images or the classes.
        """
        self.meta, self.info = meta, flags.info
        self.num_classes = num_classes = flags.info.num_classes
        self.graph = tf.Graph()
        with self.graph.as_default():
            try:
                tf.compat.v1.train.import_meta_graph(str(meta), clear_devices=True)
            except (OSError, ValueError, tf.errors.OpError) as e:
                raise CheckpointError(f"{meta.name}: cannot import the meta graph ({str(e).splitlines()[0]})") from e
            except Exception as e:  # protobuf's DecodeError for a file that is not a MetaGraphDef
                raise CheckpointError(f"{meta.name}: not a meta graph ({type(e).__name__})") from e
        self.input = _tensor(self.graph, flags.input, "--input", meta)
        self.output = _tensor(self.graph, flags.output, "--output", meta)
        self.batch, self.image_shape = _image_shape(self.input, flags.info.input_spec, meta)
        _check_output(self.output, num_classes, meta)
        self.softmax = self.output.op.type == "Softmax"  # the output is probabilities, not logits
        threads = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=tf.config.threading.get_intra_op_parallelism_threads(),
            inter_op_parallelism_threads=tf.config.threading.get_inter_op_parallelism_threads())
        self.session = tf.compat.v1.Session(graph=self.graph, config=threads)
        self._savers: dict[str, tf.compat.v1.train.Saver] = {}

    def var_list(self, weights: str) -> dict[str, tf.Variable]:
        """Checkpoint name -> variable: trainable ones from their shadows for "ema", every one as it is for "raw".

        The "ema" list is `ExponentialMovingAverage.variables_to_restore()`: the other variables
        (the step, batch-norm statistics) are restored as they are.
        """
        with self.graph.as_default():
            variables = tf.compat.v1.global_variables()
            trainable = {v.op.name for v in tf.compat.v1.trainable_variables()}
        own = [v for v in variables if not v.op.name.endswith(EMA_SUFFIX)]
        if weights == "raw":
            return {v.op.name: v for v in own}
        return {(v.op.name + EMA_SUFFIX if v.op.name in trainable else v.op.name): v for v in own}

    def restore(self, prefix: Path, weights: str) -> None:
        """Load checkpoint `prefix`'s EMA shadows (or raw variables) into the session.

        Raises:
          CheckpointError: the checkpoint lacks a variable (every missing name is listed; for EMA
            weights, never a fall-back to the raw ones), has another shape, or cannot be read.
        """
        mapping = self.var_list(weights)
        try:
            stored = checkpoints.open_reader(prefix).get_variable_to_shape_map()
        except READ_ERRORS as e:
            raise CheckpointError(f"{prefix.name}: cannot read ({type(e).__name__}: {str(e).splitlines()[0]})") from e
        missing = sorted(k for k in mapping if k not in stored)
        if missing:
            what = "moving averages" if weights == "ema" else "variables"
            raise CheckpointError(f"{prefix.name}: the checkpoint has no {what} {', '.join(missing)}")
        # Built and run inside the graph: outside it, the Saver would take the eager path.
        with self.graph.as_default():
            if weights not in self._savers:
                self._savers[weights] = tf.compat.v1.train.Saver(mapping, name=f"restore_{weights}")
            try:
                self._savers[weights].restore(self.session, str(prefix))
            except READ_ERRORS as e:
                raise CheckpointError(f"{prefix.name}: cannot restore ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0]})") from e

    def outputs(self, images: np.ndarray) -> np.ndarray:
        """The output for stored images (uint8 [N, 28, 28] for MNIST), preprocessed and shaped as the input wants."""
        size = self.batch or BATCH_SIZE
        parts = []
        for start in range(0, len(images), size):
            chunk = self.info.preprocessing.apply_numpy(images[start:start + size])
            n = len(chunk)
            if self.batch:  # a fixed batch size: pad the last batch, keep only the real rows
                chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), np.float32)])
            feed = chunk.reshape(len(chunk), *self.image_shape).astype(self.input.dtype.as_numpy_dtype)
            result = np.asarray(self.session.run(self.output, {self.input: feed}), dtype=np.float64)
            parts.append(result[:n])
        out = np.concatenate(parts) if parts else np.zeros((0, self.num_classes))
        if out.ndim != 2 or out.shape[1] != self.num_classes:
            raise CheckpointError(f"--output {self.output.name} gave shape {out.shape}; expected "
                                  f"[N, {self.num_classes}]")
        return out

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """Softmax of logits (outputs that are probabilities already are returned as they are)."""
        if self.softmax:
            return outputs
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)

    def metrics(self, split: datasets.Split) -> dict[str, Any]:
        """`accuracy` (arg-max of the output), `loss` (mean cross-entropy), `per_class_accuracy` and `count`."""
        outputs = self.outputs(split.images)
        probs = self.probabilities(outputs)
        correct = np.argmax(outputs, axis=1) == split.labels
        picked = probs[np.arange(len(split)), split.labels]
        totals = np.bincount(split.labels, minlength=self.num_classes)
        right = np.bincount(split.labels[correct], minlength=self.num_classes)
        return {"accuracy": float(correct.mean()) if len(split) else 0.0,
                "loss": float(-np.log(np.maximum(picked, 1e-30)).mean()) if len(split) else 0.0,
                "per_class_accuracy": [float(c / t) if t else None for c, t in zip(right, totals, strict=True)],
                "count": len(split)}

    def close(self) -> None:
        self.session.close()


def meta_of(prefix: Path) -> Path:
    """The `.meta` file of checkpoint `prefix`."""
    return Path(f"{prefix}{META_SUFFIX}")


def missing_file(prefix: Path) -> str | None:
    """The name of the first of Saver checkpoint `prefix`'s `.index` and `.meta` that is not there, else None."""
    for path in (Path(f"{prefix}.index"), meta_of(prefix)):
        if not path.is_file():
            return path.name
    return None
