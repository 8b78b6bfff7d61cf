"""`evaluator export --tf1-graph`: a TF1 Saver checkpoint's graph, frozen with its EMA weights as constants.

The tutorials froze a graph with `convert_variables_to_constants`; so does this, then wraps it to
take what this project's exports take: uint8 images [N, 28, 28] as `images:0`, with the outputs
`probabilities:0`, `classes:0` and `class_names:0`. The same graph is saved as a TF1 SavedModel
whose `serving_default` signature has those names, so `predict --model` and `predict --graph` use either.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf
from tensorflow.python.util import deprecation

from common.checkpoint.tf1graph import GraphFlags, SaverGraph, meta_of, missing_file, read_saver_step
from common.errors import UsageError
from common.run.locate import BEST, LATEST, LocateError, locate
from common.run.workdir import Workdir
from common.storage.paths import local_only
from evaluator.serving.export import (
    FROZEN_FILE,
    FROZEN_INPUT,
    check_target,
    save_into,
    write_folder,
    write_labels,
    write_marker,
)


def resolve(workdir: Workdir, step: str) -> Path:
    """The Saver checkpoint that `--step N|best|latest` names in `workdir`, with its `.index` and `.meta` there."""
    if not (step.isdigit() or step in (BEST, LATEST)):
        raise UsageError(f"--step ({step!r}) must be a step number, 'best' or 'latest'")
    try:
        prefix = Path(locate(workdir, int(step) if step.isdigit() else step, check=False))
    except LocateError as e:
        raise UsageError(f"{workdir}: {e.why} (run the evaluator first, or use --step latest)") from None
    if not os.path.realpath(prefix).startswith(os.path.realpath(workdir.location) + os.sep):
        raise UsageError(f"{prefix}: the state file names a checkpoint outside the workdir; refused")
    missing = missing_file(prefix)
    if missing:
        raise UsageError(f"{prefix.name}: cannot be exported ({missing} is missing)")
    return prefix


def serving_graph(graph: SaverGraph, class_names: tuple[str, ...]) -> tf.compat.v1.GraphDef:
    """The restored graph frozen, behind `images:0` (stored images, uint8 [N, 28, 28] for MNIST) -> probabilities,
    classes, class_names."""
    try:
        with deprecation.silence():  # the tutorials' TF1 call, kept on purpose
            frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
                graph.session, graph.graph.as_graph_def(), [graph.output.op.name])
    except (ValueError, tf.errors.OpError) as e:
        raise UsageError(f"cannot freeze the graph at --output {graph.output.name} ({str(e).splitlines()[0]})") from e
    wrapper = tf.Graph()
    with wrapper.as_default():
        spec = graph.info.input_spec
        images = tf.compat.v1.placeholder(tf.as_dtype(spec.dtype), [None, *spec.stored_shape], name=FROZEN_INPUT)
        scaled = tf.cast(graph.info.preprocessing.apply(images, spec), graph.input.dtype)
        fed = tf.reshape(scaled, [-1, *graph.image_shape])
        try:
            (out,) = tf.graph_util.import_graph_def(frozen, input_map={graph.input.name: fed},
                                                    return_elements=[graph.output.name], name="model")
        except ValueError as e:
            raise UsageError(f"--input {graph.input.name}: cannot feed the frozen graph "
                             f"({str(e).splitlines()[0]})") from e
        probabilities = tf.identity(out if graph.softmax else tf.nn.softmax(out), name="probabilities")
        classes = tf.argmax(probabilities, axis=1, name="classes")
        tf.gather(tf.constant(list(class_names)), classes, name="class_names")
    return wrapper.as_graph_def()


def save_model(graph_def: tf.compat.v1.GraphDef, path: str) -> None:
    """A TF1 SavedModel of the frozen graph, with signature serving_default: images -> the three outputs."""
    graph = tf.Graph()
    # TF1's SavedModel builder runs in graph mode; its deprecation notices say nothing to a user here.
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session, deprecation.silence():
        tf.graph_util.import_graph_def(graph_def, name="")
        tensor = graph.get_tensor_by_name
        signature = tf.compat.v1.saved_model.signature_def_utils.predict_signature_def(
            inputs={"images": tensor(f"{FROZEN_INPUT}:0")},
            outputs={name: tensor(f"{name}:0") for name in ("probabilities", "classes", "class_names")})
        builder = tf.compat.v1.saved_model.Builder(path)
        builder.add_meta_graph_and_variables(session, [tf.saved_model.SERVING],
                                             signature_def_map={"serving_default": signature})
        builder.save()


def export_graph(workdir: Workdir, flags: GraphFlags, *, step: str = "best", weights: str = "ema",
                 out: Path | None = None, frozen: bool = False) -> Path:
    """Write the export of a TF1 Saver checkpoint atomically and return its path.

    Raises:
      UsageError: no such checkpoint, or flags that do not fit its graph.
      CheckpointError: the checkpoint cannot be restored (for EMA weights: it has no shadows).
      WorkdirIOError: the export cannot be written.
    """
    root = local_only(workdir.location, "evaluator export --tf1-graph")
    if weights not in ("ema", "raw"):
        raise UsageError(f"--weights ({weights!r}) must be ema or raw")
    prefix = resolve(workdir, step)
    number = read_saver_step(prefix)
    target = Path(os.path.abspath(out if out is not None else root / "export" / str(number)))
    check_target(target)
    names = flags.class_names()
    graph = SaverGraph(meta_of(prefix), flags)
    try:
        graph.restore(prefix, weights)
        graph_def = serving_graph(graph, names)
    finally:
        graph.close()

    def fill(tmp: Path) -> None:
        write_labels(tmp, names)
        save_into(tmp, lambda saved: save_model(graph_def, saved))
        if frozen:
            (tmp / FROZEN_FILE).write_bytes(graph_def.SerializeToString())
        write_marker(tmp, workdir, prefix.name, number, weights, dataset=flags.dataset or "",
                     source="tf1-graph", input=flags.input, output=flags.output)

    write_folder(target, fill)
    return target

