"""`evaluator report`: a confusion matrix, per-class metrics, misclassified examples and the accuracy curve."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display is ever needed
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

from common.checkpoint import checkpoints
from common.checkpoint.tf1graph import GraphFlags, SaverGraph, meta_of, missing_file
from common.data import datasets
from common.errors import UsageError
from common.layout import EVAL_DIR
from common.run.ledger import Ledger, Record
from common.run.loader import load_model
from common.run.locate import BEST, Located, NoBest, Unreadable, locate
from common.run.spec import RunSpec, read_run
from common.run.workdir import Workdir
from common.storage import Gone
from common.storage.paths import Location, refuse_bucket

GRID = 6  # misclassified examples are shown in a GRID x GRID image
METRICS_FILE = "metrics.json"  # written last: a report folder that holds it is complete


def print_warning(text: str) -> None:
    """Print a warning on stderr as the evaluator's commands do."""
    print(f"evaluator: warning: {text}", file=sys.stderr)


def resolve(workdir: Workdir, step: str, *, tf1: bool = False) -> tuple[int | None, Located]:
    """The step and checkpoint that `--step N|best` names; UsageError when it cannot be used.

    `tf1`: a TF1 Saver workdir, whose step is in the checkpoint's name (its restore checks the files).
    The step of this project's best checkpoint is None: it is read from the copy that the report
    reads anyway (a bucket's download), as is the checkpoint itself, which its restore checks.
    """
    records = [r for r in Ledger(workdir.storage).read() if r.get("status") == "ok"]
    if not records:
        raise UsageError(f"{workdir}: the ledger is empty; run 'evaluator --once' first")
    if step == BEST:
        try:
            # Not checked here: the restore that follows reads the whole checkpoint anyway.
            located = locate(workdir, BEST, check=False)
        except NoBest:
            raise UsageError(f"{workdir}: no best checkpoint yet (it is kept from validation evaluations)") from None
        if not tf1:
            return None, located
        number = checkpoints.saver_step(located.name)
        if number is None:
            raise UsageError(f"{located.name}: the best checkpoint's name carries no step")
        return number, located
    if not step.isdigit():
        raise UsageError(f"--step ({step!r}) must be a step number or 'best'")
    wanted = int(step)
    if wanted not in {r.get("step") for r in records}:
        known = sorted({int(r["step"]) for r in records if r.get("step") is not None})
        raise UsageError(f"step {wanted} is not in the ledger (evaluated steps: {', '.join(map(str, known))})")
    try:
        return wanted, locate(workdir, wanted, check=not tf1)
    except Unreadable as e:
        raise UsageError(f"step {wanted} is no longer {workdir.storage.held} ({e.why})") from None


def _own_run(workdir: Workdir, step: str, split_name: str, data_dir: str | None,
             warn: Callable[[str], None]) -> tuple[int, Located, datasets.Split, np.ndarray, tuple[str, ...]]:
    """Step, checkpoint, split, predictions and class names for a workdir of this project's trainer.

    A bucket's checkpoint is read from a local download; one that vanishes during it is a UsageError.
    """
    spec = read_run(workdir.storage)
    if spec is None:
        raise UsageError(f"{workdir}: no run.json (not a trainer workdir; a TF1 Saver workdir needs --tf1-graph)")
    number, located = resolve(workdir, step)
    loaded = spec.load_data(data_dir)
    for text in loaded.warnings:
        warn(text)
    split = loaded.data.split(split_name)
    try:
        with located.readable() as prefix:
            number = checkpoints.read_step(prefix) if number is None else number
            preds = predict(spec, prefix, split.images)
    except Gone as e:
        what = f"step {number}" if number is not None else f"the best checkpoint {located.name}"
        raise UsageError(f"{what} is no longer in the bucket ({e})") from None
    return number, located, split, preds, spec.class_names


def _graph_run(workdir: Workdir, graph: GraphFlags, step: str, split_name: str,
               data_dir: str | None) -> tuple[int, Path, datasets.Split, np.ndarray, tuple[str, ...]]:
    """The same for a TF1 Saver workdir (a local one): its meta graph with the EMA shadows restored."""
    number, located = resolve(workdir, step, tf1=True)
    assert number is not None  # only a bucket's best has its step read later
    prefix = Path(located)
    missing = missing_file(prefix)
    if missing:
        raise UsageError(f"step {number} is no longer on disk ({missing} is missing)")
    split = datasets.load(graph.dataset or "", data_dir).split(split_name)
    names = graph.class_names()
    saver_graph = SaverGraph(meta_of(prefix), graph)
    try:
        saver_graph.restore(prefix, "ema")
        preds = np.argmax(saver_graph.outputs(split.images), axis=1)
    finally:
        saver_graph.close()
    return number, prefix, split, preds, names


def predict(spec: RunSpec, prefix: Path, images: np.ndarray) -> np.ndarray:
    """Class predictions of the checkpoint's EMA weights."""
    model = load_model(spec, prefix, "ema")
    logits = tf.function(lambda x: model(spec.prepare(x)))
    return np.concatenate([np.argmax(logits(images[i:i + 1000]).numpy(), axis=1)
                           for i in range(0, len(images), 1000)])


def per_class_metrics(confusion: np.ndarray, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Precision, recall and accuracy (the share of that class's images classified right) per class."""
    rows = []
    for i, name in enumerate(names):
        predicted, actual = confusion[:, i].sum(), confusion[i, :].sum()
        rows.append({"class": name, "precision": float(confusion[i, i] / predicted) if predicted else None,
                     "recall": float(confusion[i, i] / actual) if actual else None,
                     "accuracy": float(confusion[i, i] / actual) if actual else None, "examples": int(actual)})
    return rows


def confusion_text(confusion: np.ndarray, names: tuple[str, ...]) -> str:
    width = max(len(n) for n in names) + 1
    head = " " * width + "".join(f"{n[:8]:>9}" for n in names) + "   <- predicted"
    lines = [head] + [f"{name:<{width}}" + "".join(f"{v:>9d}" for v in row) for name, row in zip(names, confusion,
                                                                                              strict=True)]
    return "\n".join(lines) + "\n"


def plot_confusion(confusion: np.ndarray, names: tuple[str, ...], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if v > confusion.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_misclassified(split: datasets.Split, preds: np.ndarray, names: tuple[str, ...], path: Path) -> int:
    wrong = np.flatnonzero(preds != split.labels)[: GRID * GRID]
    fig, axes = plt.subplots(GRID, GRID, figsize=(9, 10), dpi=100)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(wrong):
            i = wrong[k]
            ax.imshow(split.images[i], cmap="gray_r")
            ax.set_title(f"true: {names[split.labels[i]]}\npred: {names[preds[i]]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(wrong)


def plot_curve(records: list[Record], path: Path) -> None:
    """Accuracy against step, one line per split and weights found in the ledger."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for split in ("validation", "test"):
        for weights in ("ema", "raw"):
            points = sorted((r["step"], r["accuracy"]) for r in records if r.get("status") == "ok"
                            and r.get("split") == split and r.get("weights") == weights)
            if points:
                steps, acc = zip(*points, strict=True)
                ax.plot(steps, [100 * a for a in acc], marker="o", label=f"{split}, {weights} weights")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(workdir: Workdir, *, step: str = "best", split_name: str = "validation",
                 data_dir: str | None = None, warn: Callable[[str], None] = print_warning,
                 graph: GraphFlags | None = None) -> Location:
    """Write eval/report-<step>/ and return it; `warn` shows what is odd about the data's source.

    Args:
      workdir: a local folder or a bucket: the report is built in a local temporary folder and
        published (`Storage.publish`), `metrics.json` last.
      graph: the --tf1-graph flags of a TF1 Saver workdir (which has no run.json); local only.

    Raises:
      UsageError: no run.json, an empty ledger, a step not in the ledger or no longer on disk (or in
        the bucket), --tf1-graph with a bucket.
      CheckpointError: the checkpoint cannot be restored.
    """
    prefix: Located | Path
    if graph is None:
        number, prefix, split, preds, names = _own_run(workdir, step, split_name, data_dir, warn)
    else:
        refuse_bucket(workdir.location, f"evaluator report --tf1-graph --workdir {workdir}: a bucket workdir is "
                                         "not supported here yet; give a local folder")
        number, prefix, split, preds, names = _graph_run(workdir, graph, step, split_name, data_dir)
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(confusion, (split.labels, preds), 1)
    key = f"{EVAL_DIR}/report-{number}"
    summary = {"step": number, "checkpoint": str(prefix), "split": split_name, "weights": "ema",
               "accuracy": float(np.trace(confusion) / confusion.sum()), "confusion": confusion.tolist(),
               "class_names": list(names), "per_class": per_class_metrics(confusion, names)}

    with tempfile.TemporaryDirectory(prefix="evaluator-report-") as tmp:
        _write_files(Path(tmp), summary, confusion, split, preds, Ledger(workdir.storage).read())
        workdir.storage.publish(Path(tmp), key, last=METRICS_FILE)
    return workdir / key


def _write_files(folder: Path, summary: dict[str, Any], confusion: np.ndarray, split: datasets.Split,
                 preds: np.ndarray, records: list[Record]) -> None:
    """Write the report's files into `folder`; `summary` (metrics.json, completed here) goes last."""
    names = tuple(summary["class_names"])
    (folder / "confusion.txt").write_text(confusion_text(confusion, names))
    (folder / "per_class.txt").write_text("".join(
        f"{r['class']:<14} precision {_pct(r['precision'])}  recall {_pct(r['recall'])}  "
        f"accuracy {_pct(r['accuracy'])}  ({r['examples']} images)\n" for r in summary["per_class"]))
    plot_confusion(confusion, names, folder / "confusion.png")
    summary["misclassified_shown"] = plot_misclassified(split, preds, names, folder / "misclassified.png")
    plot_curve(records, folder / "accuracy_curve.png")
    (folder / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{100 * x:6.2f}%"
