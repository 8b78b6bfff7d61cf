"""The trainer's configuration: one frozen dataclass, checked when it is built."""

from __future__ import annotations

import dataclasses
import functools

from common.errors import UsageError
from common.model.models import Recipe
from common.run.spec import RunSpec
from common.run.workdir import Workdir
from common.storage.paths import Location
from trainer.warmstart import InitSpec

DEFAULT_STEPS = Recipe().steps  # a model's own recipe may say otherwise (trainer.cli.build_config)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one `trainer` invocation needs."""

    spec: RunSpec  # what defines the run (stored in run.json)
    workdir: Location  # where checkpoints, run.json and the state file live: a local folder or a bucket
    steps: int = DEFAULT_STEPS  # train until global_step reaches this
    save_every: int = 1000  # steps between checkpoints (one is always saved at the end)
    keep: int = 5  # newest checkpoints kept (like max_to_keep); 0 keeps all
    keep_every_hours: float = 0.0  # also keep one checkpoint per this many hours; 0 = off
    keep_pending: int = 0  # while an evaluator watches, also keep this many not yet evaluated; 0 = off
    data_dir: str | None = None  # folder with the four IDX files; None = the usual places
    resume_from: str | None = None  # explicit checkpoint to resume from (--from)
    steps_per_loop: int = 20  # steps per tf.function call; bounds how fast a signal is seen
    log_every: int = 100  # steps between plain log lines (when output is not a terminal)
    progress: str = "auto"  # "auto", "rich" or "plain"
    save_mode: str | None = None  # "sync", "async", or None: async unless the strategy needs sync saves
    init: InitSpec | None = None  # --init-from and its options: used at the first start only
    opened: Workdir | None = dataclasses.field(default=None, compare=False, repr=False)  # `workdir`, if opened

    def __post_init__(self) -> None:
        for name in ("steps", "save_every", "steps_per_loop", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} ({value}) must be a positive integer")
        if self.keep < 0:
            raise UsageError(f"--keep ({self.keep}) must be 0 (keep all) or a positive integer")
        if self.keep_pending < 0:
            raise UsageError(f"--keep-pending ({self.keep_pending}) must be 0 (off) or a positive integer")
        if self.keep_every_hours < 0:
            raise UsageError(f"--keep-every-hours ({self.keep_every_hours}) must be 0 (off) or positive")
        if self.save_mode not in (None, "sync", "async"):
            raise UsageError(f"--save-mode ({self.save_mode!r}) must be sync or async")
        if self.progress not in ("auto", "rich", "plain"):
            raise UsageError(f"--progress ({self.progress!r}) must be auto, rich or plain")

    @functools.cached_property
    def wd(self) -> Workdir:
        """The workdir, opened once for this run (its storage and layout) and passed down with the config."""
        return self.opened if self.opened is not None else Workdir.open(self.workdir)
