"""`run.json`: what a workdir was trained with, written once at its first start.

The evaluator builds its model from this file alone, and the trainer refuses to resume a
workdir with flags that contradict it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from common import __version__
from common.errors import UsageError
from common.fileio import atomic_write_json
from common.workdir import RUN_FILE


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """The settings that define a run; a resumed run must keep every one of them."""

    dataset: str  # dataset name (common.datasets.DATASETS)
    model: str  # model name (common.models.MODELS)
    batch_size: int  # images per training step
    lr: float  # initial learning rate of Adam
    lr_decay_rate: float  # lr * lr_decay_rate ** (step / lr_decay_steps); 1.0 = constant
    lr_decay_steps: int  # steps over which the learning rate falls by lr_decay_rate
    l2: float  # weight of the L2 penalty on kernels; 0 = none
    ema_decay: float  # decay of the exponential moving averages
    seed: int  # seeds the initial weights and the data order
    class_names: tuple[str, ...]  # names of the model's output classes, in order
    classes: tuple[int, ...] = ()  # the dataset's classes this run trains on (relabelled 0..k-1); () = all
    train_examples: int = 0  # use only the first N training images (after the class subset); 0 = all
    freeze: tuple[str, ...] = ()  # patterns of model variables (`model/conv*`) that are not trained
    unfreeze_at: int = 0  # from this step every variable trains, at finetune_lr; 0 = never
    finetune_lr: float = 0.0  # the learning rate after unfreeze_at
    version: str = __version__  # version of this project that started the run
    created: float = 0.0  # UNIX time of the first start; anchors --keep-every-hours

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size > 0, "batch_size", "a positive integer"),
            (self.lr > 0, "lr", "positive"),
            (0 < self.lr_decay_rate <= 1, "lr_decay_rate", "in (0, 1]"),
            (self.lr_decay_steps > 0, "lr_decay_steps", "a positive integer"),
            (self.l2 >= 0, "l2", "non-negative"),
            (0 < self.ema_decay < 1, "ema_decay", "in (0, 1)"),
            (self.seed >= 0, "seed", "a non-negative integer"),
            (self.train_examples >= 0, "train_examples", "0 (all) or a positive integer"),
            (self.unfreeze_at >= 0, "unfreeze_at", "0 (never) or a positive step"),
            (self.finetune_lr >= 0, "finetune_lr", "0 (unused) or positive"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise UsageError(f"--{name.replace('_', '-')} ({getattr(self, name)}) must be {what}")
        if self.unfreeze_at and not (self.freeze and self.finetune_lr):
            raise UsageError("--unfreeze-at goes with --freeze and --finetune-lr")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def differences(self, other: RunSpec) -> list[str]:
        """The defining settings in which `other` differs, as `name: mine != theirs`."""
        skip = {"version", "created"}
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in skip and getattr(self, f.name) != getattr(other, f.name)
        ]

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "class_names": list(self.class_names), "classes": list(self.classes),
                "freeze": list(self.freeze)}

    def load_data(self, data_dir: str | None) -> Any:
        """The run's dataset, restricted to its classes and training images."""
        from common import datasets

        data = datasets.load(self.dataset, data_dir)
        if self.classes or self.train_examples:
            data = datasets.subset(data, self.classes, train_examples=self.train_examples)
        return data


def read_run(workdir: str | Path) -> RunSpec | None:
    """Read `run.json`; None if the workdir has none.

    Raises:
      UsageError: the file is not valid JSON or lacks fields; the message names the file.
    """
    path = Path(workdir) / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable run file ({e})") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path}: unreadable run file (not a JSON object)")
    names = {f.name for f in dataclasses.fields(RunSpec)}
    try:
        return RunSpec(**{k: v for k, v in data.items() if k in names} | {
            "class_names": tuple(data["class_names"]), "classes": tuple(data.get("classes", ())),
            "freeze": tuple(data.get("freeze", ()))})
    except (KeyError, TypeError) as e:
        raise UsageError(f"{path}: unreadable run file (missing or bad field: {e})") from e


def write_run(workdir: str | Path, spec: RunSpec) -> None:
    """Write `run.json` atomically."""
    atomic_write_json(Path(workdir) / RUN_FILE, spec.to_json())
