"""The evaluation core for TF2 checkpoints that other training loops write (any `tf.train.CheckpointManager`).

Such a workdir has no run.json and its own keys. The flags say what it cannot: the model
(`--model`), the data (`--dataset`), and where its weights and its moving averages live
(`--restore-map SAVED=MODEL`, `--ema-map SAVED=MODEL`, with the `*` of `--init-map`). Keys that
match directly need no map: `model/<path>` for the weights and `ema/<path>` for the averages, the
layout of this project's own trainer. The mapping is planned once, on the first checkpoint seen,
and printed as a table (restored from, renamed from, missing, unused); a model variable that no
key feeds is a one-line error, never a silent fresh value.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import tensorflow as tf

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import READ_ERRORS, CheckpointError
from common.checkpoint.keymap import KeyMap, map_keys
from common.data import datasets, registry, userdata
from common.errors import UsageError
from common.model import models, usermodel
from common.model import registry as model_registry
from common.model.evaluation import Evaluation
from common.model.metrics import UserMetric
from common.run.ledger import Record
from common.run.workdir import Workdir
from evaluator.core import SnapshotEvaluator
from evaluator.sets import EvalSet

STEP_KEYS = ("global_step", "step")  # a loop's step variable, under the names TF's guides use


@dataclasses.dataclass(frozen=True)
class ForeignFlags:
    """What `--model` workdirs need from the flags, since they have no run.json."""

    model: str  # the model to build: a model name or `module.path:function`
    dataset: str  # the data to evaluate on (a dataset name, or `folder:`, `npz:`, `module.path:function`)
    restore_maps: tuple[KeyMap, ...] = ()  # --restore-map: where the raw weights are
    ema_maps: tuple[KeyMap, ...] = ()  # --ema-map: where the moving averages are

    def __post_init__(self) -> None:
        registry.check(self.dataset)

    @functools.cached_property
    def info(self) -> datasets.DatasetInfo:
        """The dataset's class names, input spec and preprocessing (a folder's images at its default size).

        Cached: the live table's header asks for it at every refresh, and a folder's is read from disk.
        """
        return registry.describe(self.dataset)

    def load(self, data_dir: str | None) -> tuple[datasets.Dataset, datasets.DatasetInfo]:
        """The dataset and its description."""
        info = self.info
        if registry.is_user(self.dataset):
            data, warnings = userdata.load(self.dataset, info.input_spec)
            for text in warnings:
                print(f"evaluator: warning: {text}", file=sys.stderr)
            return data, info
        return datasets.load(self.dataset, data_dir), info

    def build(self, info: datasets.DatasetInfo) -> models.Classifier | usermodel.UserModel:
        return model_registry.build(self.model, num_classes=info.num_classes, input_shape=info.input_spec.shape)


@dataclasses.dataclass(frozen=True)
class KeyPlan:
    """For each kind of weights, the saved key that feeds each model variable."""

    prefix: Path  # the checkpoint it was planned on
    sources: dict[str, dict[str, str]]  # weights kind -> model key (`model/<path>`) -> saved key
    unused: list[str]  # saved keys that feed nothing

    def table(self) -> list[str]:
        """One line per model variable and weights kind, then the unused saved keys."""
        lines = [f"restoring from {self.prefix.name}:"]
        for kind, sources in self.sources.items():
            for key, saved in sorted(sources.items()):
                direct = saved == (key if kind == "raw" else f"{checkpoints.EMA_KEY}/{key.split('/', 1)[1]}")
                lines.append(f"  {kind:<3} {key:<22} {'restored from' if direct else 'renamed from'} {saved}")
        lines += [f"  unused saved variable: {key}" for key in self.unused]
        return lines


def saved_keys(prefix: Path) -> dict[str, list[int]]:
    """The object paths of a checkpoint's values (without TF's `/.ATTRIBUTES/VARIABLE_VALUE`) and their shapes."""
    try:
        shapes = checkpoints.open_reader(prefix).get_variable_to_shape_map()
    except READ_ERRORS as e:
        raise CheckpointError(f"{prefix.name}: cannot read ({str(e).splitlines()[0]})") from e
    suffix = checkpoints.VALUE_SUFFIX
    return {k[:-len(suffix)]: list(v) for k, v in shapes.items() if k.endswith(suffix)}


def plan(prefix: Path, model: models.Classifier, flags: ForeignFlags, kinds: tuple[str, ...]) -> KeyPlan:
    """Match the model's variables to checkpoint `prefix`'s keys, for each weights kind in `kinds`.

    Raises:
      UsageError: a map that matches nothing, a model variable no key feeds, or a shape that differs.
      CheckpointError: the checkpoint cannot be read.
    """
    saved = saved_keys(prefix)
    variables = {f"{checkpoints.MODEL_KEY}/{k}": v for k, v in model.named_variables().items()}
    sources: dict[str, dict[str, str]] = {}
    for kind in kinds:
        targets = variables if kind == "raw" else {k: v for k, v in variables.items() if v.trainable}
        maps, flag = (flags.restore_maps, "--restore-map") if kind == "raw" else (flags.ema_maps, "--ema-map")
        assign = map_keys(maps, saved, targets, flag)
        for key in targets:
            direct = key if kind == "raw" else f"{checkpoints.EMA_KEY}/{key.split('/', 1)[1]}"
            if key not in assign and direct in saved:
                assign[key] = direct
        _check(kind, flag, assign, targets, saved)
        sources[kind] = assign
    used = {k for assign in sources.values() for k in assign.values()}
    return KeyPlan(prefix, sources, sorted(k for k in saved if k not in used))


def _check(kind: str, flag: str, assign: dict[str, str], targets: dict[str, tf.Variable],
           saved: dict[str, list[int]]) -> None:
    missing = [k for k in targets if k not in assign]
    if missing:
        what = "weights" if kind == "raw" else "moving averages"
        raise UsageError(f"no {what} for {', '.join(missing)} in the checkpoint: add {flag} SAVED=MODEL "
                         f"(saved keys: {', '.join(sorted(saved))})")
    wrong = [f"{saved_key} {saved[saved_key]} -> {key} {targets[key].shape.as_list()}"
             for key, saved_key in assign.items() if saved[saved_key] != targets[key].shape.as_list()]
    if wrong:
        raise UsageError(f"{flag}: shape conflicts: {'; '.join(sorted(wrong))}")


class ForeignEvaluator(SnapshotEvaluator):
    """Evaluate another training loop's checkpoints with the flags' model, through the planned key mapping."""

    def __init__(self, workdir: Workdir, flags: ForeignFlags, info: datasets.DatasetInfo, sets: tuple[EvalSet, ...],
                 *, weights: str, strategy: tf.distribute.Strategy | None = None, top_k: int = 0,
                 metrics: tuple[UserMetric, ...] = ()) -> None:
        super().__init__(workdir, sets, weights=weights)
        self.flags = flags
        strategy = strategy or tf.distribute.get_strategy()
        with strategy.scope():
            self.model = flags.build(info)
        self.variables = {f"{checkpoints.MODEL_KEY}/{k}": v for k, v in self.model.named_variables().items()}
        self.evaluate_model = Evaluation(self.model, lambda x: info.preprocessing.apply(x, info.input_spec),
                                         strategy=strategy, top_k=top_k, metrics=metrics)
        self.plan: KeyPlan | None = None

    def check(self, prefix: Path) -> KeyPlan:
        """Plan the mapping on checkpoint `prefix` (once); print its table on stderr."""
        if self.plan is None:
            self.plan = plan(prefix, self.model, self.flags, self.weights)
            print("\n".join(self.plan.table()), file=sys.stderr, flush=True)
        return self.plan

    def _restore_weights(self, prefix: Path, kind: str) -> int | None:
        sources = self.check(prefix).sources[kind]
        checkpoints.restore_variables(prefix, {saved: self.variables[key] for key, saved in sources.items()})
        return stored_step(prefix)

    def _measure(self, eval_set: EvalSet) -> Record:
        return self.evaluate_model(eval_set.split)


def stored_step(prefix: Path) -> int | None:
    """The loop's step variable (`global_step` or `step`) when the checkpoint has one, else the name's number."""
    reader = checkpoints.open_reader(prefix)
    for key in STEP_KEYS:
        if reader.has_tensor(checkpoints.tensor_key(key)):
            return int(reader.get_tensor(checkpoints.tensor_key(key)))
    return checkpoints.saver_step(prefix)


def prepare(workdir: Workdir, flags: ForeignFlags, *, splits: tuple[str, ...], weights: str, data_dir: str | None,
            newest: Path | None, strategy: tf.distribute.Strategy | None = None, top_k: int = 0,
            metrics: tuple[UserMetric, ...] = ()) -> ForeignEvaluator:
    """The core for a `--model` workdir; the mapping is planned now on `newest`, if there is a checkpoint yet.

    `strategy`: one process's devices to evaluate over (`--strategy mirrored`).

    Raises:
      UsageError: maps or variables that do not fit the checkpoint.
      DataNotFoundError, DataFormatError: the dataset.
    """
    data, info = flags.load(data_dir)
    sets = tuple(EvalSet(name, data.split(name)) for name in splits)
    core = ForeignEvaluator(workdir, flags, info, sets, weights=weights, strategy=strategy, top_k=top_k,
                            metrics=metrics)
    if newest is not None:
        core.check(newest)
    return core
