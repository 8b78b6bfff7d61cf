"""`EvalConfig`: everything one `evaluator` invocation needs, checked when it is made."""

from __future__ import annotations

import dataclasses
import math
import os
import socket

from common.checkpoint.tf1graph import GraphFlags
from common.distribute import check_flags
from common.errors import UsageError
from common.model.metrics import metric_name, top_k_name
from common.storage.paths import Location, refuse_bucket, refuse_file
from evaluator.core import WEIGHT_CHOICES
from evaluator.foreign import ForeignFlags
from evaluator.sets import DEFAULT_SET, Selection, check_names, check_selection

MAX_INTERVAL_SECS = 86400.0  # --rescan-secs, --poll-secs and silent_secs: longer than a day is a typo
MAX_NAME = 100  # --name: shown in a table column
# The evaluation kinds each sharded strategy takes: a TF1 graph runs in a session of its own, on its
# graph's devices; several processes agree on each checkpoint by its step, which only this project's
# checkpoint names carry.
SHARDED_KINDS = {"mirrored": ("native", "other-loop"), "multi-worker": ("native",)}
_KIND_NAMES = {"native": "this project's runs", "other-loop": "--model", "tf1-graph": "--tf1-graph"}


def default_name() -> str:
    """An evaluator's name when --name is not given: `host:pid`, unique among live evaluators."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything one `evaluator` invocation needs."""

    workdir: Location  # the trainer's workdir: a local folder or a bucket
    splits: tuple[str, ...] = (DEFAULT_SET,)  # --split, repeatable: the run's splits to evaluate on
    eval_data: tuple[tuple[str, str], ...] = ()  # --eval-data NAME=REF: more sets, from dataset references
    select: str = ""  # --select SET[:METRIC[:max|min]]: the result that decides; "" = validation's accuracy
    top_k: int = 0  # --top-k K: also top-K accuracy on every set; 0 = off
    metrics: tuple[str, ...] = ()  # --metric pkg.mod:fn, repeatable: users' metrics (common.model.metrics)
    backfill: bool = False  # evaluate sets an earlier evaluator left out on checkpoints it recorded
    weights: str = "ema"  # ema, raw or both
    policy: str = "all"  # all: every pending checkpoint, oldest first; latest: only the newest
    data_dir: str | None = None  # folder with the IDX files; None = the usual places
    rescan_secs: float = 10.0  # rescan this often even without events
    poll: bool = False  # use watchdog's polling observer (network filesystems)
    poll_secs: float = 1.0  # interval of the polling observer
    exit_when_done: bool = False  # watch mode: exit after the finished run's last checkpoint
    silent_secs: float = 120.0  # warn when the trainer's heartbeat is older than this
    patience: int = 0  # ask the trainer to stop after this many evaluations without improvement; 0 = off
    min_delta: float = 0.0  # an improvement must beat the best accuracy by more than this
    per_class: bool = False  # show per-class accuracy under the live table
    graph: GraphFlags | None = None  # --tf1-graph: a TF1 Saver workdir evaluated through its meta graph
    foreign: ForeignFlags | None = None  # --model: another TF2 loop's checkpoints, through key maps
    strategy: str = "default"  # --strategy: default (one device), auto, mirrored (several devices) or multi-worker
    devices: int = 0  # --devices N: mirrored over N logical CPU devices; 0 = every GPU (or the CPU)
    name: str = dataclasses.field(default_factory=lambda: default_name())  # --name: in each row it evaluates
    # `select` parsed; None when nothing decides (no --select, and validation is not evaluated): then
    # eval/best is left alone, as by an evaluator of the test split alone.
    selection: Selection | None = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        names = check_names(self.splits, self.eval_data)
        if not names:
            raise UsageError("name at least one set to evaluate (--split or --eval-data)")
        chosen = Selection.parse(self.select) if self.select else Selection() if DEFAULT_SET in names else None
        object.__setattr__(self, "selection", chosen)
        if self.top_k < 0:
            raise UsageError(f"--top-k ({self.top_k}) must be 0 (off) or a positive integer")
        if chosen is not None:
            check_selection(chosen, names, self.extra_metrics)
        elif self.patience:
            raise UsageError("--patience watches the selected set (--select; validation by default), which is not "
                             "evaluated: add --split validation or --select SET")
        choices = {"weights": tuple(WEIGHT_CHOICES), "policy": ("all", "latest")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{name} ({getattr(self, name)!r}) must be one of: {', '.join(allowed)}")
        for name in ("rescan_secs", "poll_secs", "silent_secs"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= MAX_INTERVAL_SECS):
                raise UsageError(f"--{name.replace('_', '-')} ({value}) must be positive and at most "
                                 f"{MAX_INTERVAL_SECS:.0f} seconds (one day)")
        if not math.isfinite(self.min_delta):
            raise UsageError(f"--min-delta ({self.min_delta}) must be a finite number")
        if self.patience < 0 or self.min_delta < 0:
            raise UsageError(f"--patience ({self.patience}) and --min-delta ({self.min_delta}) must not be negative")
        if not self.name.strip() or len(self.name) > MAX_NAME or "\n" in self.name:
            raise UsageError(f"--name ({self.name!r}) must be a non-empty line of at most {MAX_NAME} characters")
        if self.graph is not None and self.foreign is not None:
            raise UsageError("--tf1-graph and --model exclude each other")
        if self.graph is not None and self.graph.dataset is None:
            raise UsageError("--tf1-graph needs --dataset: the workdir has no run.json to say which")
        if self.graph is not None and (self.eval_data or self.top_k or self.metrics):
            raise UsageError("--eval-data, --top-k and --metric go with this project's runs and --model, "
                             "not --tf1-graph")
        if self.foreign is not None and self.eval_data:
            raise UsageError("--eval-data goes with this project's runs (run.json says how to prepare the images), "
                             "not --model")
        check_flags(self.strategy, self.devices)
        if self.strategy in SHARDED_KINDS and self.kind not in SHARDED_KINDS[self.strategy]:
            takes = " and ".join(_KIND_NAMES[k] for k in SHARDED_KINDS[self.strategy])
            raise UsageError(f"--strategy {self.strategy} goes with {takes}, not {_KIND_NAMES[self.kind]}")
        if self.kind != "native":
            refuse_bucket(self.workdir, f"--{'tf1-graph' if self.graph is not None else 'model'} goes with a local "
                                        f"--workdir, not {self.workdir}")

    @property
    def extra_metrics(self) -> tuple[str, ...]:
        """The metrics computed beside accuracy and loss: top-k accuracy, then the users' (by name)."""
        return ((top_k_name(self.top_k),) if self.top_k else ()) + tuple(metric_name(r) for r in self.metrics)

    @property
    def set_names(self) -> tuple[str, ...]:
        """Every evaluation set, in the order the flags name them: the splits, then --eval-data's sets."""
        return (*self.splits, *(name for name, _ in self.eval_data))

    @property
    def kind(self) -> str:
        """Which evaluation core the flags ask for (`evaluator.session.KINDS`)."""
        return "tf1-graph" if self.graph is not None else "other-loop" if self.foreign is not None else "native"


def require_folder(workdir: Location) -> None:
    """Refuse a workdir that exists but is not a folder (a file given by mistake)."""
    refuse_file(workdir, f"--workdir {workdir}: this is a file, not a folder")
