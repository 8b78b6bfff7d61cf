"""The models `predict` can use: this project's export, workdir or checkpoint, or a foreign frozen graph."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from common.data import datasets
from common.data import registry as data_registry
from common.data.inputspec import InputSpec
from common.errors import BucketUnusable, UsageError
from common.run.loader import load_model
from common.run.locate import BEST_ELSE_LATEST, PREFIX_ONLY, Located, NoCheckpoint, Unreadable, locate
from common.run.spec import read_run
from common.storage import Gone, open_storage, read_json
from common.storage.paths import Location, local_folder_with
from evaluator.serving.export import LABELS_FILE, MARKER_FILE
from evaluator.serving.images import ImageError, plain_resize, preprocess, read_as_trained, read_gray
from evaluator.serving.labels import read_labels

Classifier = Callable[[list[Path]], list[np.ndarray | str]]  # one probability vector (or an error) per file


def _batch(files: list[Path], spec: InputSpec, dataset: str,
           do_preprocess: bool) -> tuple[list[int], np.ndarray, list[str | None]]:
    """Decode every file; return the indices that worked, their images as `spec` stores them, and each file's error."""
    if spec.dtype != "uint8":
        raise UsageError(f"this run's images are {spec.describe()} arrays (from {dataset}); image files give "
                         "uint8 pixels, so call the export's serving_default with arrays like the training ones")
    ok: list[int] = []
    images: list[np.ndarray] = []
    errors: list[str | None] = []
    for i, path in enumerate(files):
        try:
            image = _read(path, spec, dataset, do_preprocess)
        except ImageError as e:
            errors.append(str(e))
            continue
        errors.append(None)
        ok.append(i)
        images.append(image)
    return ok, np.stack(images) if images else np.zeros((0, *spec.stored_shape), np.uint8), errors


def _read(path: Path, spec: InputSpec, dataset: str, do_preprocess: bool) -> np.ndarray:
    """One file as `spec` stores images: a user's data as the trainer read them, else made like the dataset."""
    if data_registry.is_user(dataset):
        return read_as_trained(path, spec)
    gray = read_gray(path)
    return preprocess(gray, spec, dataset) if do_preprocess else plain_resize(gray, spec)


def _merge(n: int, ok: list[int], probs: np.ndarray, errors: list[str | None]) -> list[np.ndarray | str]:
    out: list[np.ndarray | str] = [errors[i] or "" for i in range(n)]
    for row, i in enumerate(ok):
        out[i] = probs[row]
    return out


def own_model(path: Location, *, preprocess: bool) -> tuple[Classifier, list[str]]:
    """A classifier from an export folder, a workdir (best, else latest, EMA) or a checkpoint prefix.

    A workdir or prefix may be in a bucket (`s3://b/run`): the checkpoint is downloaded to load it.
    """
    export = local_folder_with(path, "saved_model.pb")
    if export is not None:
        return _from_export(export, preprocess)
    prefix = _checkpoint_of(path)
    spec = read_run(prefix.storage)  # a workdir's, or that of the folder a prefix lies in
    if spec is None:
        raise UsageError(f"{prefix.storage.location()}: no run.json beside the checkpoint")
    try:
        with prefix.readable() as local:
            model = load_model(spec, local, "ema")
    except Gone as e:
        raise UsageError(f"--model {path}: {prefix.name} went away while being read ({e})") from None
    forward = tf.function(lambda x: tf.nn.softmax(model(spec.prepare(x))))

    def classify(files: list[Path]) -> list[np.ndarray | str]:
        ok, images, errors = _batch(files, spec.input, spec.dataset, preprocess)
        probs = forward(images).numpy() if len(images) else np.zeros((0, spec.num_classes))
        return _merge(len(files), ok, probs, errors)

    return classify, list(spec.class_names)


def _checkpoint_of(path: Location) -> Located:
    """The checkpoint that `--model PATH` names."""
    try:
        # A workdir's checkpoint is read in full by the restore that follows; a prefix is checked here
        # so that a path that is nothing usable gets the message below.
        return locate(path, BEST_ELSE_LATEST, check=PREFIX_ONLY)
    except NoCheckpoint:
        raise UsageError(f"--model {path}: not an export, and a workdir without checkpoints") from None
    except Unreadable as e:
        raise UsageError(f"--model {path}: not an export, a workdir or a readable checkpoint ({e.why})") from None
    except BucketUnusable as e:
        raise e.for_flag("--model", path) from None


def _from_export(path: Path, do_preprocess: bool) -> tuple[Classifier, list[str]]:
    try:
        loaded = tf.saved_model.load(str(path))
        serve = loaded.signatures["serving_default"]
    except (KeyError, OSError, ValueError, tf.errors.OpError) as e:
        raise UsageError(f"--model {path}: cannot load the export ({str(e).splitlines()[0]})") from None
    inputs = serve.structured_input_signature[1]
    if list(inputs) != ["images"] or "probabilities" not in serve.structured_outputs:
        raise UsageError(f"--model {path}: unexpected serving signature (inputs {sorted(inputs)}, outputs "
                         f"{sorted(serve.structured_outputs)}); expected images -> probabilities")
    names_file = path / LABELS_FILE
    names = names_file.read_text().splitlines() if names_file.is_file() else []
    # Exports of this project carry run.json, those of a TF1 graph name their dataset in export.json;
    # others are prepared MNIST-style.
    storage = open_storage(path)  # the export folder, opened once
    spec = read_run(storage)
    marker = read_json(storage, MARKER_FILE) or {}
    dataset = spec.dataset if spec is not None else str(marker.get("dataset") or "mnist")
    input_spec = spec.input if spec is not None else datasets.get_info(dataset).input_spec
    num_classes = serve.structured_outputs["probabilities"].shape[-1] or len(names)

    def classify(files: list[Path]) -> list[np.ndarray | str]:
        ok, images, errors = _batch(files, input_spec, dataset, do_preprocess)
        if not len(images):
            return _merge(len(files), ok, np.zeros((0, num_classes)), errors)
        return _merge(len(files), ok, serve(images=tf.constant(images))["probabilities"].numpy(), errors)

    return classify, names


def foreign_graph(args: argparse.Namespace) -> tuple[Classifier, list[str]]:
    """A classifier from a frozen GraphDef, fed encoded bytes or a decoded float image as it expects."""
    if not args.input or not args.output:
        raise UsageError("--graph needs --input and --output (tensor names, e.g. DecodeJpeg/contents:0)")
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(args.graph.read_bytes())
    except OSError as e:
        raise UsageError(f"--graph {args.graph}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # protobuf's DecodeError
        raise UsageError(f"--graph {args.graph}: not a GraphDef ({e})") from None
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    try:
        inp = graph.get_tensor_by_name(_tensor(args.input))
        out = graph.get_tensor_by_name(_tensor(args.output))
    except (KeyError, ValueError) as e:
        raise UsageError(f"--graph {args.graph}: {e}") from None
    labels = read_labels(args)
    session = tf.compat.v1.Session(graph=graph)

    def run_one(path: Path) -> np.ndarray | str:
        try:
            feed = _feed(path, inp, args.input_mean, args.input_std)
        except ImageError as e:
            return str(e)
        probs = np.asarray(session.run(out, {inp: feed}), dtype=np.float64).reshape(-1)
        return probs

    return (lambda files: [run_one(p) for p in files]), labels


def _tensor(name: str) -> str:
    return name if ":" in name else f"{name}:0"


def _feed(path: Path, inp: tf.Tensor, mean: float, std: float) -> np.ndarray | bytes:
    """What to feed `inp` for one file: the file's bytes for a string input, else a decoded float image."""
    if inp.dtype == tf.string:
        read_gray(path)  # refuse non-images, damaged files and bombs before the graph sees them
        return path.read_bytes()
    from PIL import Image

    shape = inp.shape.as_list()
    # [N, H, W, C], [H, W, C] (C of 1 or 3), [N, H, W] or [H, W].
    batched = len(shape) == 4 or (len(shape) == 3 and shape[-1] not in (1, 3))
    spatial = shape[1:] if batched else shape
    height, width = spatial[0], spatial[1]
    channels = spatial[2] if len(spatial) == 3 else None
    image = Image.fromarray((read_gray(path) * 255).astype(np.uint8))
    if height and width:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    if channels:
        pixels = np.repeat(pixels[..., None], channels, axis=-1)
    if inp.dtype.is_floating:
        pixels = (pixels - mean) / std  # integer inputs take the pixel values as they are
    return (pixels[None] if batched else pixels).astype(inp.dtype.as_numpy_dtype)
