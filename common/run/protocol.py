"""The files one program writes for the other: one typed message per file, with its read and write.

- `TrainerHeartbeat`, `heartbeat.json`: the trainer's step and speed, rewritten about once a second;
- `TrainingDone`, `done.json`: written by the trainer when it reached --steps or honoured a stop request;
- `EarlyStopRequest`, `stop_request.json`: written by the evaluator (--patience) to stop the trainer;
- `BestEntry`, `eval/best.json`: the evaluator's best checkpoint, which the trainer's retention keeps;
- `LedgerRow`, a line of `eval/results.jsonl`: one evaluation, for the evaluator and its reports.

Reads are tolerant, as reads of files another process (perhaps an older version) wrote must be:
an absent or unreadable file, or one whose known fields hold values of the wrong type, reads as
None; fields an older version did not write take their defaults; fields this version does not
know are kept in `extra` and written back. Writes are atomic (`Storage.write`), so a reader never
sees half a file, and raise OSError.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.layout import BEST_JSON, DONE_FILE, EVAL_DIR, HEARTBEAT_FILE, STOP_REQUEST_FILE
from common.storage import Storage, read_json, write_json
from common.storage.fileio import atomic_write_bytes

SPENT_KEY = "spent_stop_request"  # in done.json and heartbeat.json: the stop request already honoured
FINGERPRINT = "index_fingerprint"  # ledger rows: what identifies a checkpoint's content (its `.index`)

_INT: tuple[type, ...] = (int,)
_NUM: tuple[type, ...] = (int, float)
_STR: tuple[type, ...] = (str,)
_DICT: tuple[type, ...] = (dict,)
_LIST: tuple[type, ...] = (list,)
Schema = Mapping[str, tuple[type, ...]]


def _valid(obj: Any, schema: Schema) -> bool:
    """Whether `obj` is a JSON object whose known fields hold null or a value of their type."""
    if not isinstance(obj, dict):
        return False
    # bool is an int to Python, never a step or a number to these files.
    return all(obj[k] is None or (isinstance(obj[k], types) and not isinstance(obj[k], bool))
               for k, types in schema.items() if k in obj)


def _extra(obj: Mapping[str, Any], schema: Schema) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in schema}


def _without_none(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class StopRequestId:
    """What tells one stop request from another: the step and time the evaluator wrote it with."""

    step: int | None = None
    time: float | None = None

    @classmethod
    def from_json(cls, obj: Any) -> StopRequestId | None:
        """The id in `obj`, or None if it is not one."""
        if not _valid(obj, {"step": _INT, "time": _NUM}):
            return None
        return cls(step=obj.get("step"), time=obj.get("time"))

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "time": self.time}


_STOP_SCHEMA: Schema = {"step": _INT, "reason": _STR, "time": _NUM, "pid": _INT}


@dataclasses.dataclass(frozen=True)
class EarlyStopRequest:
    """`stop_request.json`: the evaluator (--patience) asks the trainer to stop, saving first."""

    step: int | None = None  # the last evaluated step; a request without one is ignored
    reason: str | None = None  # shown by the trainer when it stops
    time: float | None = None  # when it was written; with `step`, tells requests apart
    pid: int | None = None  # the evaluator that wrote it
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def id(self) -> StopRequestId:
        return StopRequestId(step=self.step, time=self.time)

    @classmethod
    def from_json(cls, obj: Any) -> EarlyStopRequest | None:
        if not _valid(obj, _STOP_SCHEMA):
            return None
        return cls(**{k: obj.get(k) for k in _STOP_SCHEMA}, extra=_extra(obj, _STOP_SCHEMA))

    def to_json(self) -> dict[str, Any]:
        return {**self.extra, "step": self.step, "reason": self.reason, "time": self.time, "pid": self.pid}

    @classmethod
    def read(cls, storage: Storage) -> EarlyStopRequest | None:
        """The workdir's stop request, or None if there is none or it cannot be read."""
        return cls.from_json(read_json(storage, STOP_REQUEST_FILE))

    def write(self, storage: Storage) -> None:
        write_json(storage, STOP_REQUEST_FILE, self.to_json())


_BEAT_SCHEMA: Schema = {"step": _INT, "total_steps": _INT, "steps_per_sec": _NUM, "loss": _NUM, "lr": _NUM,
                        "state": _STR, "time": _NUM, "pid": _INT, SPENT_KEY: _DICT}


@dataclasses.dataclass(frozen=True)
class TrainerHeartbeat:
    """`heartbeat.json`: the trainer's last step, speed and time. Fields it did not know are left out."""

    step: int | None = None  # absent in the last write, when the trainer stopped
    total_steps: int | None = None  # --steps
    steps_per_sec: float | None = None
    loss: float | None = None
    lr: float | None = None
    state: str | None = None  # running, or stopped once the trainer exits
    time: float | None = None  # of the write, by the trainer's clock
    pid: int | None = None
    spent_stop_request: StopRequestId | None = None  # kept here while done.json is gone (see TrainingDone)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, obj: Any) -> TrainerHeartbeat | None:
        if not _valid(obj, _BEAT_SCHEMA) or (obj.get(SPENT_KEY) and StopRequestId.from_json(obj[SPENT_KEY]) is None):
            return None
        fields = {k: obj.get(k) for k in _BEAT_SCHEMA if k != SPENT_KEY}
        return cls(**fields, spent_stop_request=StopRequestId.from_json(obj.get(SPENT_KEY)),
                   extra=_extra(obj, _BEAT_SCHEMA))

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], **fields: Any) -> TrainerHeartbeat:
        """A heartbeat from the training loop's metrics; metrics it has no field for go into `extra`."""
        known = {k: v for k, v in metrics.items() if k in _BEAT_SCHEMA and k != SPENT_KEY}
        return cls(**known | fields, extra=_extra(metrics, _BEAT_SCHEMA))

    def to_json(self) -> dict[str, Any]:
        fields = {k: getattr(self, k) for k in _BEAT_SCHEMA if k != SPENT_KEY}
        spent = self.spent_stop_request.to_json() if self.spent_stop_request else None
        return {**self.extra, **_without_none(fields | {SPENT_KEY: spent})}

    @classmethod
    def read(cls, storage: Storage) -> TrainerHeartbeat | None:
        return cls.from_json(read_json(storage, HEARTBEAT_FILE))

    def write(self, storage: Storage) -> None:
        write_json(storage, HEARTBEAT_FILE, self.to_json())


_DONE_SCHEMA: Schema = {"step": _INT, "checkpoint": _STR, "time": _NUM, "stop_reason": _STR, "ema_metrics": _DICT,
                        SPENT_KEY: _DICT}


@dataclasses.dataclass(frozen=True)
class TrainingDone:
    """`done.json`: the trainer reached --steps (or was stopped early by a request) and evaluated its EMA weights."""

    step: int | None = None  # of the last checkpoint
    checkpoint: str | None = None  # its name
    time: float | None = None
    stop_reason: str | None = None  # why it stopped before --steps; None when it reached them
    ema_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # final metrics per split
    # The request this run stopped for, else the one it found spent: neither stops a later run.
    spent_stop_request: StopRequestId | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, obj: Any) -> TrainingDone | None:
        if not _valid(obj, _DONE_SCHEMA) or (obj.get(SPENT_KEY) and StopRequestId.from_json(obj[SPENT_KEY]) is None):
            return None
        return cls(step=obj.get("step"), checkpoint=obj.get("checkpoint"), time=obj.get("time"),
                   stop_reason=obj.get("stop_reason"), ema_metrics=obj.get("ema_metrics") or {},
                   spent_stop_request=StopRequestId.from_json(obj.get(SPENT_KEY)), extra=_extra(obj, _DONE_SCHEMA))

    def to_json(self) -> dict[str, Any]:
        spent = self.spent_stop_request.to_json() if self.spent_stop_request else None
        return {**self.extra, "step": self.step, "checkpoint": self.checkpoint, "time": self.time,
                "stop_reason": self.stop_reason, "ema_metrics": self.ema_metrics, SPENT_KEY: spent}

    @classmethod
    def read(cls, storage: Storage) -> TrainingDone | None:
        return cls.from_json(read_json(storage, DONE_FILE))

    def write(self, storage: Storage) -> None:
        write_json(storage, DONE_FILE, self.to_json())


_BEST_SCHEMA: Schema = {"step": _INT, "checkpoint": _STR, "accuracy": _NUM, "loss": _NUM, "split": _STR,
                        "weights": _STR, "committed": _NUM, "source": _STR, "time": _NUM, "metric": _STR,
                        "mode": _STR, "value": _NUM}
_RANKING = ("metric", "mode", "value")  # BestEntry's fields of the selected result (evaluator --select)


@dataclasses.dataclass(frozen=True)
class BestEntry:
    """`eval/best.json`: the checkpoint kept in `eval/best/` and the result that made it the best.

    That is the `metric` of set `split`, `mode` max or min; entries written before those fields
    were recorded ranked validation accuracy, higher being better.
    """

    checkpoint: str  # its name, inside eval/best/; an entry without one is unreadable
    step: int | None = None
    accuracy: float | None = None
    loss: float | None = None
    split: str | None = None
    weights: str | None = None
    committed: float | None = None  # the state file's time for it
    source: str | None = None  # where it was in the workdir
    time: float | None = None  # when it became the best
    metric: str | None = None  # the metric that ranked it (None: accuracy)
    mode: str | None = None  # max or min: which way is better (None: max)
    value: float | None = None  # its value of `metric` (None: `accuracy`)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, obj: Any) -> BestEntry | None:
        if not _valid(obj, _BEST_SCHEMA) or not isinstance(obj.get("checkpoint"), str):
            return None
        return cls(**{k: obj.get(k) for k in _BEST_SCHEMA}, extra=_extra(obj, _BEST_SCHEMA))

    def to_json(self) -> dict[str, Any]:
        # The ranking's fields only when known, so that an entry written before them reads back as it was.
        return {**self.extra, **{k: getattr(self, k) for k in _BEST_SCHEMA
                                 if k not in _RANKING or getattr(self, k) is not None}}

    @classmethod
    def read(cls, storage: Storage) -> BestEntry | None:
        """The workdir's best checkpoint (eval/best.json), or None if there is none yet or it is unreadable."""
        return cls.from_json(read_json(storage, f"{EVAL_DIR}/{BEST_JSON}"))

    @classmethod
    def read_from(cls, folder: Path) -> BestEntry | None:
        """The entry in local folder `folder`/best.json (a pinned copy, a copied best folder)."""
        try:
            return cls.from_json(json.loads((folder / BEST_JSON).read_text("utf-8")))
        except (OSError, ValueError):
            return None

    def write_into(self, folder: Path) -> None:
        """Write best.json into local folder `folder` (a pinned copy, before it becomes the best)."""
        atomic_write_bytes(folder / BEST_JSON, (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode())


_ROW_SCHEMA: Schema = {"checkpoint": _STR, "step": _INT, "split": _STR, "weights": _STR, "status": _STR,
                       "reason": _STR, "accuracy": _NUM, "loss": _NUM, "per_class_accuracy": _LIST,
                       "committed": _NUM, "finished": _NUM, "eval_secs": _NUM, FINGERPRINT: _STR,
                       "evaluator": _STR}


@dataclasses.dataclass(frozen=True)
class LedgerRow:
    """One line of `eval/results.jsonl`: one evaluation of one checkpoint version, split and weights.

    A row holds whatever the evaluation measured (open-ended metrics), so it keeps its whole JSON
    object in `fields` and gives typed access to the fields the programs act on. Rows written
    before the `.index` fingerprint existed have no `index_fingerprint` key (`fingerprinted`).
    """

    fields: Mapping[str, Any]

    @classmethod
    def from_json(cls, obj: Any) -> LedgerRow | None:
        return cls(dict(obj)) if _valid(obj, _ROW_SCHEMA) else None

    def to_json(self) -> dict[str, Any]:
        return dict(self.fields)

    @classmethod
    def from_line(cls, line: bytes) -> LedgerRow | None:
        """The row on one line, or None if it is not UTF-8 JSON, not an object, or has a field of the wrong type."""
        try:
            obj = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is a ValueError too
            return None
        return cls.from_json(obj)

    def to_line(self) -> bytes:
        return json.dumps(self.fields, sort_keys=True).encode("utf-8") + b"\n"

    @property
    def checkpoint(self) -> str:
        return str(self.fields.get("checkpoint"))

    @property
    def step(self) -> int | None:
        return self.fields.get("step")

    @property
    def split(self) -> str | None:
        return self.fields.get("split")

    @property
    def weights(self) -> str | None:
        return self.fields.get("weights")

    @property
    def status(self) -> str:
        """ok, gone, error, or failed (a problem of this machine; evaluated again later)."""
        return str(self.fields.get("status"))

    @property
    def reason(self) -> str:
        return str(self.fields.get("reason") or "")

    @property
    def accuracy(self) -> float | None:
        return self.fields.get("accuracy")

    @property
    def loss(self) -> float | None:
        return self.fields.get("loss")

    @property
    def per_class_accuracy(self) -> list[float | None]:
        return list(self.fields.get("per_class_accuracy") or [])

    @property
    def committed(self) -> float | None:
        return self.fields.get("committed")

    @property
    def finished(self) -> float | None:
        return self.fields.get("finished")

    @property
    def eval_secs(self) -> float | None:
        return self.fields.get("eval_secs")

    @property
    def evaluator(self) -> str:
        """Who evaluated it (its `--name`, by default host:pid); "" in rows written before the field."""
        return str(self.fields.get("evaluator") or "")

    @property
    def fingerprinted(self) -> bool:
        return FINGERPRINT in self.fields

    @property
    def index_fingerprint(self) -> str | None:
        return self.fields.get(FINGERPRINT)
