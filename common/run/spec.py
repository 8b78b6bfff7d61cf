"""`run.json`: what a workdir was trained with, written once at its first start.

The evaluator builds its model from this file alone, and the trainer refuses to resume a
workdir with flags that contradict it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from common import __version__
from common.data import datasets, userdata
from common.data import registry as data_registry
from common.data.inputspec import InputSpec, Preprocessing
from common.errors import DataNotFoundError, UsageError
from common.layout import RUN_FILE
from common.storage import Storage, write_json

# Bounds on what is read from run.json: a real one is about 1 kB with at most 10 class names, and
# a hand-made file with 10^6 names once cost the evaluator 10.5 GB of memory.
MAX_RUN_FILE_BYTES = 1_000_000
MAX_CLASS_NAMES = 10_000
_INT_FIELDS = ("batch_size", "lr_decay_steps", "seed", "train_examples", "unfreeze_at", "replicas", "workers")
_NUMBER_FIELDS = ("lr", "lr_decay_rate", "l2", "label_smoothing", "ema_decay", "finetune_lr", "created")
_TEXT_FIELDS = ("dataset", "model", "version", "data_source", "data_fingerprint", "strategy")
# Where the data came from and what ran it, not what defines the run: a resume may read the same
# data from elsewhere, on another number of devices or workers.
_PROVENANCE_FIELDS = {"version", "created", "data_source", "data_fingerprint", "strategy", "replicas", "workers"}
_LIST_FIELDS = {"class_names": str, "classes": int, "freeze": str}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """The settings that define a run; a resumed run must keep every one of them."""

    dataset: str  # dataset name (common.data.datasets.DATASETS)
    model: str  # model name (common.model.models.MODELS)
    batch_size: int  # images per training step
    lr: float  # initial learning rate of Adam
    lr_decay_rate: float  # lr * lr_decay_rate ** (step / lr_decay_steps); 1.0 = constant
    lr_decay_steps: int  # steps over which the learning rate falls by lr_decay_rate
    l2: float  # weight of the L2 penalty on kernels; 0 = none
    ema_decay: float  # decay of the exponential moving averages
    seed: int  # seeds the initial weights and the data order
    class_names: tuple[str, ...]  # names of the model's output classes, in order
    # Share of each training label spread evenly over all classes (the loss's targets, not the data);
    # 0 = none. run.json files written before it existed hold none, and trained without.
    label_smoothing: float = 0.0
    classes: tuple[int, ...] = ()  # the dataset's classes this run trains on (relabelled 0..k-1); () = all
    train_examples: int = 0  # use only the first N training images (after the class subset); 0 = all
    freeze: tuple[str, ...] = ()  # patterns of model variables (`model/conv*`) that are not trained
    unfreeze_at: int = 0  # from this step every variable trains, at finetune_lr; 0 = never
    finetune_lr: float = 0.0  # the learning rate after unfreeze_at
    version: str = __version__  # version of this project that started the run
    created: float = 0.0  # UNIX time of the first start; anchors --keep-every-hours
    data_source: str = ""  # absolute path of the folder (or .npz file) the first start loaded; "" = not recorded
    data_fingerprint: str = ""  # common.data.datasets.fingerprint of that data; "" = not recorded
    strategy: str = ""  # the first start's tf.distribute strategy (default, mirrored, multi-worker); "" = not recorded
    replicas: int = 0  # the first start's replicas in sync (batch_size is split among them); 0 = not recorded
    workers: int = 0  # the first start's worker processes; 0 = not recorded
    # The images the model takes and how pixels become its inputs; None = the dataset's own (run.json
    # files written before these were recorded hold none).
    input_spec: InputSpec | None = None
    preprocessing: Preprocessing | None = None

    def __post_init__(self) -> None:
        self._check_types()
        self._check_names()
        self._default_input()
        checks = [
            (self.batch_size > 0, "batch_size", "a positive integer"),
            (self.lr > 0, "lr", "positive"),
            (0 < self.lr_decay_rate <= 1, "lr_decay_rate", "in (0, 1]"),
            (self.lr_decay_steps > 0, "lr_decay_steps", "a positive integer"),
            (self.l2 >= 0, "l2", "non-negative"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
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
        self._check_classes()

    def _check_types(self) -> None:
        """Refuse values of the wrong type (a hand-edited run.json), before any comparison can raise."""
        for name in _INT_FIELDS:
            if not _is_int(getattr(self, name)):
                raise UsageError(f"--{name.replace('_', '-')} ({getattr(self, name)!r}) must be an integer")
        for name in _NUMBER_FIELDS:
            value = getattr(self, name)
            if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise UsageError(f"--{name.replace('_', '-')} ({value!r}) must be a finite number")
        for name in _TEXT_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise UsageError(f"{name} ({getattr(self, name)!r}) must be a string")
        for name, kind in _LIST_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(_is_int(v) if kind is int else isinstance(v, kind)
                                                       for v in value):
                raise UsageError(f"{name} ({_short(value)}) must be a list of {kind.__name__}s")

    def _check_names(self) -> None:
        """Refuse an unknown dataset or model by name, whatever wrote it (a user's data or model is not imported)."""
        from common.model import registry as model_registry

        data_registry.check(self.dataset)
        model_registry.check(self.model)

    def _default_input(self) -> None:
        """A built-in dataset's input spec and preprocessing where none is recorded; a user's data must record them."""

        if data_registry.is_user(self.dataset):
            if self.input_spec is None or self.preprocessing is None:
                raise UsageError(f"dataset {self.dataset}: input_spec and preprocessing must be recorded")
            return
        info = datasets.get_info(self.dataset)
        if self.input_spec is None:
            object.__setattr__(self, "input_spec", info.input_spec)
        if self.preprocessing is None:
            object.__setattr__(self, "preprocessing", info.preprocessing)

    def _check_classes(self) -> None:
        """Classes must exist in the dataset, differ, and match the class names one to one."""

        if data_registry.is_user(self.dataset):
            if self.classes:
                raise UsageError(f"--classes goes with the built-in datasets, not {self.dataset}")
            if len(self.class_names) < 2:
                raise UsageError(f"class_names ({list(self.class_names)}) must name at least two classes")
            return
        size = len(datasets.get_info(self.dataset).class_names)
        bad = [c for c in self.classes if not 0 <= c < size]
        if bad:
            raise UsageError(f"classes ({list(self.classes)}): {bad[0]} is not a class of {self.dataset} "
                             f"(0-{size - 1})")
        if self.classes and (len(set(self.classes)) != len(self.classes) or len(self.classes) < 2):
            raise UsageError(f"classes ({list(self.classes)}) must name at least two different classes")
        expected = len(self.classes) or size
        if len(self.class_names) != expected:
            raise UsageError(f"class_names has {len(self.class_names)} names but the run has {expected} classes")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def differences(self, other: RunSpec) -> list[str]:
        """The defining settings in which `other` differs, as `name: mine != theirs`."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in _PROVENANCE_FIELDS and getattr(self, f.name) != getattr(other, f.name)
        ]

    @property
    def input(self) -> InputSpec:
        """The images the model takes (the dataset's, unless run.json says otherwise)."""
        assert self.input_spec is not None  # set in __post_init__
        return self.input_spec

    @property
    def prep(self) -> Preprocessing:
        """How stored pixels become the model's inputs."""
        assert self.preprocessing is not None  # set in __post_init__
        return self.preprocessing

    def prepare(self, images: Any) -> Any:
        """Turn stored images into the model's float inputs `[N, H, W, C]` (common.data.inputspec)."""
        return self.prep.apply(images, self.input)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "class_names": list(self.class_names), "classes": list(self.classes),
                "freeze": list(self.freeze), "input_spec": self.input.to_json(),
                "preprocessing": self.prep.to_json()}

    def load_data(self, data_dir: str | None) -> RunData:
        """The run's dataset, restricted to its classes and training images.

        Without `data_dir` the recorded `data_source` is used, and the usual places only when it no
        longer holds the dataset. Both that fall-back and data that differ from the recorded
        fingerprint are returned as warnings for the caller to show.
        """

        warnings: list[str] = []
        data = None
        if data_registry.is_user(self.dataset):
            data, warnings = self._load_user_data(data_dir)
        elif data_dir is None and self.data_source:
            try:
                data = datasets.load(self.dataset, self.data_source)
            except DataNotFoundError:
                warnings.append(f"the data folder this run was trained on, {self.data_source}, no longer holds "
                                f"{self.dataset}; looking in the usual places (pass --data-dir to choose)")
        if data is None:
            data = datasets.load(self.dataset, data_dir)
        fingerprint = datasets.fingerprint(data)
        if self.data_fingerprint and fingerprint != self.data_fingerprint:
            warnings.append(f"the data loaded from {data.source} (fingerprint {fingerprint}) differ from the data "
                            f"this run was trained on (fingerprint {self.data_fingerprint})")
        # A dataset function's source is its import path, not a file.
        source = str(Path(data.source).resolve()) if Path(data.source).exists() else data.source
        if self.classes or self.train_examples:
            data = datasets.subset(data, self.classes, train_examples=self.train_examples)
        return RunData(data, source, fingerprint, tuple(warnings))

    def _load_user_data(self, data_dir: str | None) -> tuple[datasets.Dataset, list[str]]:
        """A user's data (common.data.userdata), which must still have this run's classes and image spec."""

        if data_dir is not None:
            raise UsageError(f"--data-dir goes with the built-in datasets; this run reads {self.dataset}")
        data, warnings = userdata.load(self.dataset, self.input)
        if data.info.class_names != self.class_names:
            raise UsageError(f"{self.dataset} now has the classes {list(data.info.class_names)}, but this run was "
                             f"trained on {list(self.class_names)}")
        if data.info.input_spec != self.input or data.info.preprocessing != self.prep:
            raise UsageError(f"{self.dataset} now holds {data.info.input_spec.describe()} images, but this run "
                             f"was trained on {self.input.describe()}")
        return data, warnings


@dataclasses.dataclass(frozen=True)
class RunData:
    """What `RunSpec.load_data` loaded, and from where."""

    data: datasets.Dataset  # the run's data, restricted to its classes and training images
    source: str  # absolute path of the folder (or .npz file) it came from
    fingerprint: str  # common.data.datasets.fingerprint of everything loaded there, before the restriction
    warnings: tuple[str, ...]  # a fall-back from the recorded folder, or data unlike the recorded ones


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_run(storage: Storage) -> RunSpec | None:
    """Read `run.json`; None if the workdir has none.

    Raises:
      UsageError: the file is too large, not valid JSON, lacks fields or holds a bad value; the
        message names the file.
    """
    path = storage.describe(RUN_FILE)
    try:
        raw = storage.read(RUN_FILE, limit=MAX_RUN_FILE_BYTES + 1)
    except NotADirectoryError:
        return None
    except OSError as e:
        raise UsageError(f"{path}: unreadable run file ({e.strerror or e})") from e
    if raw is None:
        return None
    if len(raw) > MAX_RUN_FILE_BYTES:
        raise UsageError(f"{path}: run file larger than {MAX_RUN_FILE_BYTES:,} bytes; not a run.json of this project")
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise UsageError(f"{path}: unreadable run file ({e})") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path}: unreadable run file (not a JSON object)")
    try:
        return RunSpec(**_fields_from_json(data))
    except (KeyError, TypeError) as e:
        raise UsageError(f"{path}: unreadable run file (missing or bad field: {e})") from e
    except UsageError as e:
        raise UsageError(f"{path}: bad run file: {e}") from e


def _fields_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """RunSpec's fields from run.json's object: lists become tuples, unknown keys are ignored."""
    names = {f.name for f in dataclasses.fields(RunSpec)}
    fields = {k: v for k, v in data.items() if k in names}
    if "class_names" not in fields:
        raise KeyError("class_names")
    for name in _LIST_FIELDS:
        value = fields.get(name, [])
        if not isinstance(value, list):
            raise UsageError(f"{name} ({_short(value)}) must be a list")
        if name == "class_names" and len(value) > MAX_CLASS_NAMES:
            raise UsageError(f"class_names has {len(value):,} names (at most {MAX_CLASS_NAMES:,})")
        fields[name] = tuple(value)
    if "input_spec" in fields:
        fields["input_spec"] = InputSpec.from_json(fields["input_spec"])
    if "preprocessing" in fields:
        fields["preprocessing"] = Preprocessing.from_json(fields["preprocessing"])
    return fields


def run_file_bytes(spec: RunSpec) -> bytes:
    """`run.json`'s content for `spec` (as `write_run` writes it), for a copy outside a workdir (an export)."""
    return (json.dumps(spec.to_json(), indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_run(storage: Storage, spec: RunSpec) -> None:
    """Write `run.json` atomically."""
    write_json(storage, RUN_FILE, spec.to_json())
