"""Evaluation sets and the selection: which data each checkpoint is evaluated on, and which result decides.

A checkpoint is evaluated on every set the flags name: the run's splits (`--split validation
--split test`) and named sets from any dataset reference (`--eval-data NAME=REF`). One of them,
with one metric and its direction, decides (`--select SET[:METRIC[:max|min]]`): eval/best,
--patience and the trainer's retention of the best follow it; the other sets are reported only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.data import datasets, userdata
from common.errors import DataNotFoundError, UsageError
from common.run.spec import RunSpec

SPLITS = ("validation", "test")  # the run's own splits that --split takes
DEFAULT_SET = "validation"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
# Directions of the built-in metrics; a user's metric must say its own.
_DIRECTIONS = {"accuracy": "max", "loss": "min"}
_TOP_K = re.compile(r"^top(\d+)_accuracy$")


class SetError(UsageError):
    """A set or metric the flags name cannot be used, whatever the workdir holds later (exit 2)."""


class SetNotFound(DataNotFoundError):
    """A set the flags name is not there (exit 4, as for a run's data)."""


SET_ERRORS = (SetError, SetNotFound)  # the watch loop stops for these instead of waiting for the workdir


def fingerprint(split: datasets.Split) -> str:
    """A short hash of a split's images and labels, so results on different data never mix silently."""
    digest = hashlib.sha256(datasets.content(split.images))
    digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One evaluation set: its name in the ledger's `split` field, and its images and labels."""

    name: str
    split: datasets.Split = dataclasses.field(repr=False)
    source: str = ""  # where a named set came from (its reference); "" for the run's splits
    fingerprint: str = dataclasses.field(init=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", fingerprint(self.split))

    @property
    def fields(self) -> dict[str, Any]:
        """What each ledger row of this set records about the data."""
        return {"split": self.name, "data_fingerprint": self.fingerprint, "examples": len(self.split)}


def parse_eval_data(texts: list[str] | tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """`--eval-data NAME=REF` flags as (name, reference) pairs; UsageError for a malformed one."""
    pairs = []
    for text in texts:
        name, sep, ref = text.partition("=")
        if not sep or not ref:
            raise UsageError(f"--eval-data {text!r}: expected NAME=REF, e.g. shifted=folder:/data/shifted")
        pairs.append((name, userdata.absolute(ref)))
    return tuple(pairs)


def check_names(splits: tuple[str, ...], eval_data: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """The sets' names in order, each checked: known splits, well-formed and unique names."""
    for split in splits:
        if split not in SPLITS:
            raise UsageError(f"--split ({split!r}) must be one of: {', '.join(SPLITS)}")
    for name, ref in eval_data:
        if not _NAME.match(name) or name in (*SPLITS, "train"):
            raise UsageError(f"--eval-data {name}={ref}: the name must be 1-40 letters, digits, '.', '_' or '-', "
                             "and not a split's name (train, validation, test)")
        if not userdata.is_reference(ref):
            raise UsageError(f"--eval-data {name}={ref}: expected folder:PATH, npz:PATH or pkg.mod:fn")
    names = (*splits, *(name for name, _ in eval_data))
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"the set {twice[0]!r} is named twice (--split, --eval-data)")
    return names


@dataclasses.dataclass(frozen=True)
class Selection:
    """The result that decides: a set, a metric of it, and whether higher or lower is better."""

    set: str = DEFAULT_SET
    metric: str = "accuracy"
    mode: str = "max"

    @classmethod
    def parse(cls, text: str, flag: str = "--select") -> Selection:
        """`SET[:METRIC[:max|min]]`; the built-in metrics know their direction, a user's must say it."""
        parts = text.split(":")
        if len(parts) > 3 or not all(parts):
            raise UsageError(f"{flag} ({text!r}) must be SET, SET:METRIC or SET:METRIC:max|min")
        name, metric = parts[0], parts[1] if len(parts) > 1 else "accuracy"
        mode = parts[2] if len(parts) > 2 else direction(metric)
        if mode is None:
            raise UsageError(f"{flag} {text}: say whether higher or lower {metric} is better: "
                             f"{name}:{metric}:max or {name}:{metric}:min")
        if mode not in ("max", "min"):
            raise UsageError(f"{flag} {text}: the direction ({mode!r}) must be max or min")
        return cls(name, metric, mode)

    def describe(self) -> str:
        return f"{self.set} {self.metric} ({'higher' if self.mode == 'max' else 'lower'} is better)"

    def value(self, fields: Mapping[str, Any]) -> float | None:
        """The selected metric in a ledger row's fields, or None when it has none."""
        value = metric_value(fields, self.metric)
        return None if value is None else float(value)

    def score(self, fields: Mapping[str, Any]) -> float | None:
        """The value turned so that higher is always better (its negative for `min`)."""
        value = self.value(fields)
        return None if value is None else (value if self.mode == "max" else -value)


DEFAULT_SELECTION = Selection()  # validation accuracy, higher is better


def direction(metric: str) -> str | None:
    """The built-in direction of `metric` (max or min), or None for a user's metric."""
    return "max" if _TOP_K.match(metric) else _DIRECTIONS.get(metric)


def is_fraction(metric: str) -> bool:
    """Whether `metric` is one of the built-in accuracies, shown in percent (a user's metric never is)."""
    return metric == "accuracy" or bool(_TOP_K.match(metric))


def show_value(metric: str, value: float | None) -> str:
    """A metric's value for people: the built-in accuracies in percent, anything else to four decimals."""
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if is_fraction(metric) else f"{value:.4f}"


def metric_value(fields: Mapping[str, Any], metric: str) -> Any:
    """A metric of a ledger row: accuracy and loss at the top, the others under `metrics`."""
    if metric in _DIRECTIONS:
        return fields.get(metric)
    extra = fields.get("metrics")
    return extra.get(metric) if isinstance(extra, Mapping) else None


def check_selection(selection: Selection, names: tuple[str, ...], extra_metrics: tuple[str, ...]) -> None:
    """Refuse a selection of a set that is not evaluated, or of a metric that is not computed."""
    if selection.set not in names:
        raise UsageError(f"--select {selection.set}: not an evaluated set (they are: {', '.join(names)})")
    computed = ["accuracy", "loss", *extra_metrics]
    if selection.metric not in computed:
        raise UsageError(f"--select {selection.set}:{selection.metric}: not a computed metric "
                         f"(they are: {', '.join(computed)}; --top-k K adds top<K>_accuracy)")


def load_named_set(name: str, reference: str, spec: RunSpec) -> tuple[EvalSet, list[str]]:
    """Set `name` from `reference`, checked against the run: its images must be the model's, its classes the run's.

    Labels are mapped to the run's classes by name (a set may hold fewer classes); a reference
    that names no classes gives labels that are the run's class indices.

    Raises:
      UsageError: the images or the classes do not fit the model (DataFormatError and
        DataNotFoundError, which are UsageErrors too, for a reference that cannot be read).
    """
    split, class_names, images, warnings = userdata.load_eval_split(reference, spec.input)
    what = f"--eval-data {name}={reference}"
    if len(split) == 0:
        raise UsageError(f"{what}: holds no examples")
    if images != spec.input:
        raise UsageError(f"{what}: holds {images.describe()} images; the model takes {spec.input.describe()}")
    if class_names is None:  # arrays that name no classes: the labels are the run's class indices
        if split.labels.max(initial=0) >= spec.num_classes:
            raise UsageError(f"{what}: labels go up to {split.labels.max()}; the run has {spec.num_classes} classes")
        return EvalSet(name, split, reference), warnings
    index = np.array([_class_index(c, spec.class_names, what) for c in class_names], dtype=np.int64)
    return EvalSet(name, datasets.Split(split.images, index[split.labels]), reference), warnings


def _class_index(found: str, classes: tuple[str, ...], what: str) -> int:
    """The run's index of class `found`: its name, or (for a folder) the name with `/` written as `_`."""
    for i, name in enumerate(classes):
        if found in (name, name.replace("/", "_")):
            return i
    raise UsageError(f"{what}: a class the model does not know: {found} (its classes: {', '.join(classes)}; "
                     "a folder stands for a class whose name holds '/' with '_' in its place)")


def check_reused(sets: list[EvalSet], records: list[dict[str, Any]]) -> None:
    """Refuse a named set whose name the ledger holds results of other data under (they would mix silently)."""
    for eval_set in sets:
        if not eval_set.source:
            continue
        other = next((r.get("data_fingerprint") for r in records if r.get("split") == eval_set.name
                      and r.get("data_fingerprint") not in (None, eval_set.fingerprint)), None)
        if other is not None:
            raise SetError(f"--eval-data {eval_set.name}={eval_set.source}: the ledger holds results of other data "
                           f"under the name {eval_set.name!r} (fingerprint {other}, these {eval_set.fingerprint}): "
                           "give this set a name of its own")
