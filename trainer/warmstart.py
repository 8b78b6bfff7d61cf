"""`--init-from`: start a new run from another run's variables, by pattern and under other names.

Keys are the model's own (`model/conv1/kernel`); with `--init-weights ema` (the default) they are
read from the source's `ema/...` shadows, the tutorial's `variables_to_restore` trick.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fnmatch
from pathlib import Path

import tensorflow as tf

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import CheckpointError
from common.checkpoint.keymap import map_keys
from common.errors import BucketUnusable, UsageError
from common.run.locate import BEST_ELSE_LATEST, NoCheckpoint, Unreadable, locate
from common.storage import Gone
from common.storage.paths import as_workdir


@dataclasses.dataclass(frozen=True)
class InitSpec:
    """Where and how to initialise a new run's variables."""

    source: str  # a checkpoint prefix, or a workdir (its best, else its latest)
    weights: str = "ema"  # ema: the source's moving averages; raw: its trained weights
    maps: tuple[tuple[str, str], ...] = ()  # (OLD, NEW) patterns; one `*` each, carried over
    only: tuple[str, ...] = ()  # restore only model variables matching one of these patterns

    def __post_init__(self) -> None:
        if self.weights not in ("ema", "raw"):
            raise UsageError(f"--init-weights ({self.weights!r}) must be ema or raw")


@dataclasses.dataclass(frozen=True)
class InitPlan:
    """What goes where: model key -> saved model key, plus what is left fresh or unused."""

    prefix: Path
    assign: dict[str, str]  # new model key -> saved model key
    fresh: dict[str, str]  # new model key -> why it stays freshly initialised
    unused: list[str]  # saved model keys nobody takes

    def table(self) -> list[str]:
        """One line per model variable, then the unused saved ones."""
        lines = [f"init from {self.prefix}:"]
        for key in sorted(set(self.assign) | set(self.fresh)):
            if key in self.assign:
                old = self.assign[key]
                how = "restored from" if old == key else "renamed from"
                lines.append(f"  {key:<22} {how} {old}")
            else:
                lines.append(f"  {key:<22} fresh ({self.fresh[key]})")
        lines += [f"  unused saved variable: {key}" for key in self.unused]
        return lines


def resolve_source(source: str) -> Path:
    """A local checkpoint prefix from `--init-from`: a prefix, or a workdir's best (else latest) checkpoint.

    A bucket's (`s3://b/run`) is downloaded into a private folder, kept until the process exits
    (the plan reads its shapes, the start its tensors) and then removed.
    """
    try:
        located = locate(as_workdir(source), BEST_ELSE_LATEST)
        return _DOWNLOADS.enter_context(located.readable())
    except NoCheckpoint:
        raise UsageError(f"--init-from {source}: a folder without checkpoints") from None
    except Unreadable as e:
        raise UsageError(f"--init-from {source}: {e.why}") from None
    except Gone as e:
        raise UsageError(f"--init-from {source}: {e}") from None
    except BucketUnusable as e:
        raise e.for_flag("--init-from", source) from None


# The downloads of bucket checkpoints that --init-from reads, removed at exit.
_DOWNLOADS = contextlib.ExitStack()
atexit.register(_DOWNLOADS.close)


def plan(spec: InitSpec, targets: dict[str, tuple[int, ...]]) -> InitPlan:
    """Decide what each model variable (`targets`: key -> shape) is initialised from.

    Raises:
      UsageError: a pattern that matches nothing, a map to an unknown variable, or shape conflicts
        (every conflicting pair is listed).
    """
    prefix, saved = _saved_shapes(spec)
    assign = map_keys(spec.maps, saved, targets, "--init-map")
    fresh: dict[str, str] = {}
    for key, shape in targets.items():
        if key in assign:
            continue
        if key not in saved:
            fresh[key] = "not in the source"
        elif saved[key] != shape:
            fresh[key] = f"saved shape {list(saved[key])} != {list(shape)}"
        else:
            assign[key] = key
    conflicts = _restrict(spec.only, targets, assign, fresh) if spec.only else []
    conflicts += [f"{old} {list(saved[old])} -> {new} {list(targets[new])}" for new, old in assign.items()
                  if saved[old] != targets[new]]
    if conflicts:
        raise UsageError(f"--init-from: shape conflicts: {'; '.join(sorted(conflicts))}")
    used = set(assign.values())
    return InitPlan(prefix, assign, fresh, sorted(k for k in saved if k not in used))


def _saved_shapes(spec: InitSpec) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """The source checkpoint, and the shape of each of its EMA (or raw) weights under its `model/` key."""
    prefix = resolve_source(spec.source)
    saved_prefix = checkpoints.EMA_KEY if spec.weights == "ema" else checkpoints.MODEL_KEY
    shapes = checkpoints.open_reader(prefix).get_variable_to_shape_map()
    saved = {f"model/{k[len(saved_prefix) + 1:-len(checkpoints.VALUE_SUFFIX)]}": tuple(v) for k, v in shapes.items()
             if k.startswith(saved_prefix + "/") and k.endswith(checkpoints.VALUE_SUFFIX)}
    if not saved:
        raise UsageError(f"--init-from {spec.source}: no {saved_prefix}/ variables in {prefix.name}")
    return prefix, saved


def _restrict(only: tuple[str, ...], targets: dict[str, tuple[int, ...]], assign: dict[str, str],
              fresh: dict[str, str]) -> list[str]:
    """Apply `--init-only`: unselected keys move from `assign` to `fresh`; return the selected shape conflicts."""
    for pattern in only:
        if not any(fnmatch.fnmatchcase(k, pattern) for k in targets):
            raise UsageError(f"--init-only {pattern}: matches no model variable")
    for key in list(assign):
        if not any(fnmatch.fnmatchcase(key, p) for p in only):
            fresh[key] = "not selected by --init-only"
            del assign[key]
    return [f"{key} {why}" for key, why in fresh.items()
            if why.startswith("saved shape") and any(fnmatch.fnmatchcase(key, p) for p in only)]


def apply(init: InitPlan, variables: dict[str, tf.Variable], weights: str) -> None:
    """Load the planned tensors into the model's variables (keys `model/...`)."""
    saved_prefix = checkpoints.EMA_KEY if weights == "ema" else checkpoints.MODEL_KEY
    mapping = {f"{saved_prefix}/{old[len('model/'):]}": variables[new] for new, old in init.assign.items()}
    try:
        checkpoints.restore_variables(init.prefix, mapping)
    except CheckpointError as e:
        raise UsageError(f"--init-from: {e}") from e
