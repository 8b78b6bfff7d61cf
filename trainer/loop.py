"""The outer loop: one place decides when to save, log and stop. The step function does the math."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import tensorflow as tf

from common import checkpoints, datasets, models
from common.checkpoints import CheckpointError, State
from common.errors import DivergedError, UsageError
from common.evaluation import Evaluation
from common.fileio import atomic_write_json
from common.paths import remove
from common.runconfig import RunSpec, read_run, write_run
from common.signals import StopRequest, stop_on_signals
from common.workdir import DONE_FILE, HEARTBEAT_FILE, STOP_REQUEST_FILE, TB_DIR, read_json
from trainer import saver as saver_lib
from trainer import warmstart
from trainer.config import TrainConfig
from trainer.inputs import steps_per_epoch, train_dataset
from trainer.lock import WorkdirLock
from trainer.progress import Heartbeat, Reporter, Tee, TensorBoardLog, log_line, make_reporter
from trainer.step import TrainState, frozen_keys, make_train_loop

SPENT_KEY = "spent_stop_request"  # in done.json and heartbeat.json: the stop request already honoured


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a call of `train` did."""

    start_step: int  # global_step at the start (0 when fresh)
    final_step: int  # global_step of the last committed checkpoint
    resumed_from: str | None  # the checkpoint restored, if any
    stopped_by: str | None  # the signal (or request) that ended training early, if any
    final_checkpoint: str | None  # prefix of the last committed checkpoint
    metrics: dict[str, Any]  # final EMA metrics per split ("validation", "test"); empty when stopped


def warn(text: str) -> None:
    """Print a warning on stderr in the log format."""
    with contextlib.suppress(BrokenPipeError):  # a closed stderr must not stop training
        print(log_line("warning", message=repr(text)), file=sys.stderr, flush=True)


def check_workdir(cfg: TrainConfig) -> RunSpec | None:
    """Validate the workdir before anything is written; return its run.json if it has one."""
    why = saver_lib.workdir_writable(cfg.workdir)
    if why:
        raise UsageError(f"--workdir {cfg.workdir}: {why}")
    existing = read_run(cfg.workdir)
    if existing is not None:
        diffs = existing.differences(cfg.spec)
        if diffs and all(d.startswith("class_names:") for d in diffs):
            # No flag sets class names: they follow from the dataset and the classes, so only an
            # edit of run.json makes them differ.
            raise UsageError(f"{cfg.workdir}/run.json was edited: its class_names {list(existing.class_names)} "
                             f"are not the names of its classes {list(cfg.spec.class_names)}; "
                             "undo the edit or use another --workdir")
        if diffs:
            raise UsageError(f"{cfg.workdir}/run.json disagrees with the flags given ({'; '.join(diffs)}); "
                             "use another --workdir or drop those flags")
    elif checkpoints.on_disk(cfg.workdir) or checkpoints.state_path(cfg.workdir).exists():
        raise UsageError(f"{cfg.workdir} holds checkpoints but no run.json; refusing to guess how they were made")
    return existing


@dataclasses.dataclass(frozen=True)
class Checked:
    """What the checks made before the first write found."""

    existing: RunSpec | None  # the workdir's run.json, if it has one
    data: datasets.Dataset  # the run's data, restricted to its classes
    init_plan: warmstart.InitPlan | None  # what --init-from assigns, when it applies


def check_inputs(cfg: TrainConfig) -> Checked:
    """Everything that can reject this start, checked before the workdir is created or written."""
    existing = check_workdir(cfg)
    data = cfg.spec.load_data(cfg.data_dir)
    steps_per_epoch(len(data.train), cfg.spec.batch_size)
    template = models.build(cfg.spec.model, num_classes=cfg.spec.num_classes)
    frozen_keys(template.named_variables(), cfg.spec.freeze)
    if cfg.resume_from is not None:
        from_prefix(cfg)
    init_plan = None
    fresh_workdir = not checkpoints.on_disk(cfg.workdir) and not checkpoints.state_path(cfg.workdir).exists()
    if cfg.init is not None and fresh_workdir and cfg.resume_from is None:
        init_plan = warmstart.plan(cfg.init, {f"model/{k}": tuple(v.shape)
                                              for k, v in template.named_variables().items()})
    return Checked(existing, data, init_plan)


def from_prefix(cfg: TrainConfig) -> Path:
    """The readable checkpoint that `--from` names (a prefix, or a name in the workdir)."""
    assert cfg.resume_from is not None
    prefix = Path(cfg.resume_from)
    if not Path(f"{prefix}.index").exists() and not prefix.is_absolute():
        prefix = cfg.workdir / prefix
    why = checkpoints.check_readable(prefix)
    if why:
        raise UsageError(f"--from {cfg.resume_from}: {why}")
    return prefix


def _resume_candidates(workdir: Path) -> tuple[list[str], State | None]:
    """Checkpoints to try, best first: the state file's choice, its others newest first, then the rest on disk."""
    try:
        state = checkpoints.read_state(workdir)
    except CheckpointError as e:
        warn(f"{e}; falling back to the checkpoints on disk")
        state = None
    on_disk = [checkpoints.name_for(s) for s in reversed(checkpoints.on_disk(workdir))]
    if state is None:
        return on_disk, None
    others = sorted((p for p in state.paths if p != state.latest), key=lambda p: checkpoints.step_of(p) or -1,
                    reverse=True)
    assert state.latest is not None
    listed = [state.latest, *others]
    return listed + [n for n in on_disk if n not in listed], state


def restore(train_state: TrainState, prefix: Path) -> int:
    """Restore everything from `prefix`; return its step."""
    try:
        train_state.checkpoint.read(str(prefix)).assert_existing_objects_matched()
    except (AssertionError, *checkpoints.READ_ERRORS) as e:
        raise CheckpointError(f"{prefix}: cannot restore ({str(e).splitlines()[0]})") from e
    return int(train_state.step.numpy())


def find_start(cfg: TrainConfig, train_state: TrainState) -> tuple[str | None, State | None]:
    """Restore the checkpoint to resume from (if any); return its path and the state file's content."""
    if cfg.resume_from is not None:
        prefix = from_prefix(cfg)
        restore(train_state, prefix)
        return str(prefix), _state_or_none(cfg.workdir)
    candidates, state = _resume_candidates(cfg.workdir)
    for path in candidates:
        if not checkpoints.inside(cfg.workdir, path):
            warn(f"skipping checkpoint {path}: the state file's path points outside the workdir")
            continue
        prefix = checkpoints.resolve(cfg.workdir, path)
        why = checkpoints.check_readable(prefix)
        if why is None:
            restore(train_state, prefix)
            return str(prefix), state
        warn(f"skipping checkpoint {path}: {why}")
    if candidates:
        raise CheckpointError(f"{cfg.workdir}: no readable checkpoint among {', '.join(candidates)}; "
                              "refusing to start fresh over them (move them away to start again)")
    return None, state


def _state_or_none(workdir: Path) -> State | None:
    try:
        return checkpoints.read_state(workdir)
    except CheckpointError as e:
        warn(str(e))
        return None


def _initial_state(workdir: Path, state: State | None) -> State:
    """The saver's view of what is committed: the state file, else the readable checkpoints on disk."""
    if state is not None:
        return state
    names = [checkpoints.name_for(s) for s in checkpoints.on_disk(workdir)]
    names = [n for n in names if checkpoints.check_readable(workdir / n) is None]
    stamps = [(workdir / f"{n}.index").stat().st_mtime for n in names]
    return State(latest=names[-1] if names else None, paths=names, timestamps=stamps)


def run_loop(cfg: TrainConfig, train_state: TrainState, data: datasets.Dataset, saver: saver_lib.CheckpointSaver,
             reporter: Reporter, stop: StopRequest, *,
             spent: dict[str, Any] | None = None) -> tuple[int, str | None, dict[str, Any] | None]:
    """Train from the restored step to `cfg.steps`.

    Returns:
      The last step, the last saved prefix, and the id of the stop request honoured (if any).
    """
    step = start = int(train_state.step.numpy())
    strategy = train_state.strategy
    spec = train_state.spec
    ds = train_dataset(data.train, batch_size=spec.batch_size, seed=spec.seed, start_step=step)
    iterator = iter(strategy.experimental_distribute_dataset(ds))
    loops = {False: make_train_loop(train_state, spec.batch_size)}
    last_saved: str | None = None
    honoured: dict[str, Any] | None = None
    next_save = (step // cfg.save_every + 1) * cfg.save_every
    reporter.start(first_step=step, total_steps=cfg.steps)
    while step < cfg.steps and not stop:
        n = min(cfg.steps_per_loop, next_save - step, cfg.steps - step)
        finetune = bool(spec.unfreeze_at) and step >= spec.unfreeze_at
        if spec.unfreeze_at and step < spec.unfreeze_at:
            n = min(n, spec.unfreeze_at - step)
        if finetune not in loops:
            loops[finetune] = make_train_loop(train_state, spec.batch_size, finetune=True)
            reporter.message(f"unfrozen at step {step}: every variable now trains at lr {spec.finetune_lr:g}")
        began = time.perf_counter()
        out = loops[finetune](iterator, tf.constant(n))
        if not bool(out["all_finite"]):
            raise DivergedError(f"non-finite loss between steps {step} and {step + n}; nothing after "
                                f"{last_saved or 'the last committed checkpoint'} was saved")
        step += n
        request = early_stop_request(cfg.workdir, since_step=start, spent=spent)
        if request is not None and not stop:
            stop.set(f"early stop requested by the evaluator: {request.get('reason', 'no reason given')}",
                     finish=True)
            honoured = request_id(request)
        lr = spec.finetune_lr if finetune else float(train_state.learning_rate(step))
        reporter.update({"step": step, "loss": float(out["loss"]), "steps_per_sec": n / (time.perf_counter() - began),
                         "lr": lr})
        if step >= next_save or step >= cfg.steps or stop:
            last_saved = _save(saver, train_state, step)
            next_save = (step // cfg.save_every + 1) * cfg.save_every
    return step, last_saved, honoured


def request_id(request: dict[str, Any]) -> dict[str, Any]:
    """What tells one stop request from another: the evaluator's step and time."""
    return {"step": request.get("step"), "time": request.get("time")}


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def early_stop_request(workdir: Path, *, since_step: int, spent: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """An evaluator's stop request made at or after `since_step` and not spent already, if there is one."""
    request = read_json(workdir / STOP_REQUEST_FILE)
    if request is None or not _is_step(request.get("step")) or request["step"] < since_step:
        return None
    return None if request_id(request) == spent else request


def spent_stop_request(workdir: Path) -> dict[str, Any] | None:
    """The id of the workdir's stop request if a trainer already ended the run for it, or after it.

    A request is honoured once: done.json (or, after a later start removed it, heartbeat.json)
    records the one a run stopped for, and a run that finished at or past a request's step ended
    after it anyway. Honouring it again would end every extended run at once.
    """
    request = read_json(workdir / STOP_REQUEST_FILE)
    if request is None:
        return None
    ident = request_id(request)
    done = read_json(workdir / DONE_FILE) or {}
    beat = read_json(workdir / HEARTBEAT_FILE) or {}
    if ident in (done.get(SPENT_KEY), beat.get(SPENT_KEY)):
        return ident
    if _is_step(ident["step"]) and _is_step(done.get("step")) and ident["step"] <= done["step"]:
        return ident
    return None


def _announce_stop_request(workdir: Path, start: int, spent: dict[str, Any] | None, reporter: Reporter) -> None:
    """Say why the workdir's stop request will not stop this run, if it will not."""
    request = read_json(workdir / STOP_REQUEST_FILE)
    if request is None:
        return
    step = request.get("step")
    if not isinstance(step, int) or step < start:
        reporter.message(f"ignoring the evaluator's stop request of step {step} (before step {start})")
    elif spent is not None:
        reporter.message(f"ignoring the evaluator's stop request of step {step}: already spent "
                         "(the run ended at or after it)")


def _save(saver: saver_lib.CheckpointSaver, train_state: TrainState, step: int) -> str:
    if not train_state.all_finite():
        raise DivergedError(f"non-finite weights at step {step}; not saved")
    return str(saver.save(step))


def final_metrics(train_state: TrainState, data: datasets.Dataset) -> dict[str, Any]:
    """Evaluate the EMA weights on the validation and test splits."""
    model = models.build(train_state.spec.model, num_classes=train_state.spec.num_classes)
    train_state.ema.copy_to(model)
    evaluate = Evaluation(model)
    return {split: evaluate(data.split(split)) for split in ("validation", "test")}


def train(cfg: TrainConfig, *, reporter: Reporter | None = None, stop: StopRequest | None = None,
          strategy: tf.distribute.Strategy | None = None) -> TrainResult:
    """Train (or resume) the run in `cfg.workdir` and return what happened.

    Every check that can reject the start runs before the workdir is created or written.

    Raises:
      UsageError, DataNotFoundError, CheckpointError, DivergedError, WorkdirIOError: see README.
    """
    checked = check_inputs(cfg)
    reporter = reporter or make_reporter(cfg.progress, cfg.log_every)
    stop = stop or StopRequest()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    with WorkdirLock(cfg.workdir), stop_on_signals(stop):
        spec = checked.existing or dataclasses.replace(cfg.spec, created=time.time())
        train_state = TrainState(spec, strategy or tf.distribute.get_strategy())
        resumed_from, state = find_start(cfg, train_state)
        if checked.existing is None:
            write_run(cfg.workdir, spec)
        start = int(train_state.step.numpy())
        saver = _prepare(cfg, checked, train_state, resumed_from, state, reporter)
        spent = spent_stop_request(cfg.workdir)
        _announce_stop_request(cfg.workdir, start, spent, reporter)
        heartbeat = Heartbeat(cfg.workdir, extra={SPENT_KEY: spent} if spent else None)
        # Written before done.json goes, so that a spent request stays on record if this run is killed.
        heartbeat.start(first_step=start, total_steps=cfg.steps)
        remove(cfg.workdir / DONE_FILE, cfg.workdir)
        reporter = Tee(reporter, heartbeat, TensorBoardLog(cfg.workdir / TB_DIR / "train"))
        try:
            step, last_saved, honoured = run_loop(cfg, train_state, checked.data, saver, reporter, stop, spent=spent)
            if honoured:
                heartbeat.extra[SPENT_KEY] = honoured
        finally:
            reporter.close()
        final = last_saved or resumed_from
        if stop and not stop.finish:
            reporter.message(f"stopped by {stop.reason} at step {step}; saved {Path(final or '-').name}")
            return TrainResult(start, step, resumed_from, stop.reason, final, {})
        if stop:
            reporter.message(f"stopped early at step {step}: {stop.reason}; saved {Path(final or '-').name}")
        metrics = final_metrics(train_state, checked.data)
        _report_final(reporter, step, metrics)
        # The request this run stopped for, else the one it found spent: neither stops a later run.
        atomic_write_json(cfg.workdir / DONE_FILE, {"step": step, "checkpoint": Path(final or "").name,
                                                     "time": time.time(), "stop_reason": stop.reason,
                                                     "ema_metrics": metrics, SPENT_KEY: honoured or spent})
        return TrainResult(start, step, resumed_from, stop.reason, final, metrics)


def _prepare(cfg: TrainConfig, checked: Checked, train_state: TrainState, resumed_from: str | None,
             state: State | None, reporter: Reporter) -> saver_lib.CheckpointSaver:
    """Report the start, apply --init-from, tidy the workdir and return the saver."""
    leftovers = saver_lib.clean_leftovers(cfg.workdir)
    start = int(train_state.step.numpy())
    reporter.message(f"resumed from {Path(resumed_from).name} (step {start})" if resumed_from else "starting fresh")
    if cfg.init is not None and checked.init_plan is None:
        reporter.message("--init-from ignored: this run continues from its own checkpoints")
    if checked.init_plan is not None:
        warmstart.apply(checked.init_plan,
                        {f"model/{k}": v for k, v in train_state.model.named_variables().items()},
                        cfg.init.weights if cfg.init else "ema")
        train_state.ema.reset()
        for line in checked.init_plan.table():
            reporter.message(line)
    if leftovers:
        reporter.message(f"removed leftovers of an interrupted save: {', '.join(sorted(leftovers))}")
    saver = saver_lib.CheckpointSaver(cfg.workdir, train_state.checkpoint, state=_initial_state(cfg.workdir, state),
                                      keep=cfg.keep, keep_every_hours=cfg.keep_every_hours,
                                      anchor=train_state.spec.created)
    if state is not None:
        spared = frozenset({Path(resumed_from).name}) if resumed_from else frozenset()
        gone = saver.remove_unlisted(spared)
        if gone:
            shown = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
            reporter.message(f"removed {len(gone)} checkpoint(s) that the state file no longer lists "
                             f"(left by an interrupted save): {shown}")
    data = checked.data
    reporter.message(f"data: {train_state.spec.dataset} from {data.source} (train {len(data.train)}, "
                     f"validation {len(data.validation)}, test {len(data.test)})")
    return saver


def _report_final(reporter: Reporter, step: int, metrics: dict[str, Any]) -> None:
    reporter.message(log_line("final", step=step, weights="ema",
                              validation_accuracy=round(metrics["validation"]["accuracy"], 4),
                              test_accuracy=round(metrics["test"]["accuracy"], 4),
                              validation_loss=metrics["validation"]["loss"], test_loss=metrics["test"]["loss"]))
