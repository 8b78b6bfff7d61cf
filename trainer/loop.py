"""The outer loop: one place decides when to save, log and stop. The step function does the math.

`train` runs four phases: `check_inputs` (everything that can reject the start, before any write),
`restore_or_initialise` (the checkpoint to resume from, or a fresh or warm-started state),
`run_training` (the inner loop in calls of `--steps-per-loop` steps, each followed by the actions
of `trainer.actions`) and `finish` (the last message, the final evaluation and done.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf

from common.checkpoint import checkpoints
from common.checkpoint.checkpoints import CheckpointError, State
from common.data import datasets
from common.distribute import Topology, lost_worker_errors, topology
from common.errors import BucketUnusable, DivergedError, UsageError, WorkdirIOError
from common.layout import DONE_FILE, TB_DIR
from common.model.evaluation import Evaluation
from common.run.loader import build_model
from common.run.locate import Located
from common.run.protocol import EarlyStopRequest, StopRequestId, TrainerHeartbeat, TrainingDone
from common.run.spec import RunData, RunSpec, read_run, write_run
from common.run.workdir import Workdir
from common.signals import StopRequest, stop_on_signals
from common.storage import Gone, Storage, open_source
from common.storage.mirror import MirroredFolder
from common.storage.paths import checkpoint_place
from trainer import distribute, save_modes, warmstart
from trainer import saver as saver_lib
from trainer.actions import Action, CheckStopRequest, LoopOutput, SaveCheckpoints, make_actions
from trainer.config import TrainConfig
from trainer.distribute import Peers
from trainer.inputs import steps_per_epoch
from trainer.lock import WorkdirLock
from trainer.progress import Heartbeat, Reporter, Tee, TensorBoardLog, log_line, make_reporter
from trainer.step import TrainState, frozen_keys, make_train_loop


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


# Phase 1: check the inputs. Nothing here writes.

def check_workdir(cfg: TrainConfig) -> RunSpec | None:
    """Validate the workdir before anything is written; return its run.json if it has one."""
    why = cfg.wd.storage.why_unwritable()
    if why:
        raise UsageError(f"--workdir {cfg.workdir}: {why}")
    existing = read_run(cfg.wd.storage)
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
    elif cfg.wd.steps_on_disk() or cfg.wd.storage.stat(checkpoints.STATE_FILE):
        raise UsageError(f"{cfg.workdir} holds checkpoints but no run.json; refusing to guess how they were made")
    return existing


@dataclasses.dataclass(frozen=True)
class Checked:
    """What the checks made before the first write found."""

    existing: RunSpec | None  # the workdir's run.json, if it has one
    loaded: RunData  # the run's data, restricted to its classes, and where it came from
    init_plan: warmstart.InitPlan | None  # what --init-from assigns, when it applies
    save_mode: str  # "sync" or "async" (trainer.save_modes.choose)
    save_note: str | None  # why the saves are sync although the default is async, if they are


def check_inputs(cfg: TrainConfig, topo: Topology | None = None) -> Checked:
    """Everything that can reject this start, checked before the workdir is created or written."""
    existing = check_workdir(cfg)
    if topo is not None:
        distribute.check_batch(cfg.spec.batch_size, topo)
    template = build_model(cfg.spec)  # before the data: a user's model function may fail at once
    frozen_keys(template.named_variables(), cfg.spec.freeze)
    # A resume without --data-dir reads the data from where run.json says the first start found them.
    loaded = (existing or cfg.spec).load_data(cfg.data_dir)
    for text in loaded.warnings:
        warn(text)
    data = loaded.data
    steps_per_epoch(len(data.train), cfg.spec.batch_size)
    if cfg.resume_from is not None:
        from_prefix(cfg)
    init_plan = None
    fresh_workdir = not cfg.wd.steps_on_disk() and not cfg.wd.storage.stat(checkpoints.STATE_FILE)
    if cfg.init is not None and fresh_workdir and cfg.resume_from is None:
        init_plan = warmstart.plan(cfg.init, {f"model/{k}": tuple(v.shape)
                                              for k, v in template.named_variables().items()})
    save_mode, save_note = save_modes.choose(cfg.save_mode, topo or topology(tf.distribute.get_strategy()))
    return Checked(existing, loaded, init_plan, save_mode, save_note)


def from_prefix(cfg: TrainConfig) -> Located:
    """The readable checkpoint that `--from` names (see `from_named`); a bucket's is downloaded to check it."""
    prefix = from_named(cfg)
    why = checkpoints.check_readable(prefix.storage, prefix.key)
    if why:
        raise UsageError(f"--from {cfg.resume_from}: {why}")
    return prefix


def from_named(cfg: TrainConfig) -> Located:
    """The checkpoint `--from` names: a bucket URL, a local prefix (existing or absolute), else a workdir's name."""
    text = cfg.resume_from
    assert text is not None
    try:
        place = checkpoint_place(text)
        if place is not None:
            storage, name = open_source(place)
            return Located(storage, name or place.name)
    except BucketUnusable as e:  # another bucket's: missing, or not ours to read
        raise e.for_flag("--from", text) from None
    if cfg.wd.key_of(text) is None:
        raise UsageError(f"--from {text}: not a checkpoint of a bucket or in the workdir (give a name such as "
                         "model-10, or a prefix such as s3://bucket/run/model-10)")
    return Located(cfg.wd.storage, text)


def _resume_candidates(workdir: Workdir) -> tuple[list[str], State | None]:
    """Checkpoints to try, best first: the state file's choice, its others newest first, then the rest on disk."""
    try:
        state = workdir.state()
    except CheckpointError as e:
        warn(f"{e}; falling back to the checkpoints on disk")
        state = None
    on_disk = [checkpoints.name_for(s) for s in reversed(workdir.steps_on_disk())]
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
        prefix = from_named(cfg)  # checked before the first write; a bucket's is downloaded again here
        why = _restore_if_readable(train_state, prefix)
        if why:
            raise UsageError(f"--from {cfg.resume_from}: {why}")
        return str(prefix), _state_or_none(cfg.wd)
    candidates, state = _resume_candidates(cfg.wd)
    for path in candidates:
        key = cfg.wd.key_of(path)
        if key is None or not cfg.wd.inside(path):
            warn(f"skipping checkpoint {path}: the state file's path points outside the workdir")
            continue
        found = Located(cfg.wd.storage, key)
        why = _restore_if_readable(train_state, found)
        if why is None:
            return str(found), state
        warn(f"skipping checkpoint {path}: {why}")
    if candidates:
        raise CheckpointError(f"{cfg.workdir}: no readable checkpoint among {', '.join(candidates)}; "
                              "refusing to start fresh over them (move them away to start again)")
    return None, state


def _restore_if_readable(train_state: TrainState, prefix: Located) -> str | None:
    """Restore checkpoint `prefix` (a bucket's through a local download) if readable; else say why not."""
    try:
        if prefix.storage.stat(f"{prefix.key}.index") is None:
            return f"{prefix.name}.index is missing"
        with prefix.readable() as local:
            where = str(prefix)  # a bucket's URL: messages never name the private download
            why = checkpoints.check_readable_files(local)
            if why is None:
                try:
                    restore(train_state, local)
                except CheckpointError as e:
                    raise CheckpointError(str(e).replace(str(local), where)) from e
            return None if why is None else why.replace(str(local), where)
    except Gone as e:
        return str(e)


def _state_or_none(workdir: Workdir) -> State | None:
    try:
        return workdir.state()
    except CheckpointError as e:
        warn(str(e))
        return None


def _initial_state(workdir: Workdir, state: State | None) -> State:
    """The saver's view of what is committed: the state file, else the readable checkpoints on disk."""
    if state is not None:
        return state
    names = [checkpoints.name_for(s) for s in workdir.steps_on_disk()]
    names = [n for n in names if workdir.check_readable(n) is None]
    stats = [workdir.storage.stat(f"{n}.index") for n in names]
    stamps = [stat.mtime if stat else 0.0 for stat in stats]
    return State(latest=names[-1] if names else None, paths=names, timestamps=stamps)


# Phase 2: restore or initialise.

@dataclasses.dataclass(frozen=True)
class Started:
    """Where this run starts, as `restore_or_initialise` left it."""

    train_state: TrainState  # restored, or freshly built (and warm-started)
    step: int  # global_step at the start (0 when fresh)
    resumed_from: str | None  # the checkpoint restored, if any
    saver: save_modes.SyncSaves | save_modes.AsyncSaves | distribute.ScratchSaver  # commits this run's checkpoints
    spent: StopRequestId | None  # the workdir's stop request, if a run already ended for it


def restore_or_initialise(cfg: TrainConfig, checked: Checked, reporter: Reporter,
                          strategy: tf.distribute.Strategy | None, peers: Peers | None = None) -> Started:
    """Restore the checkpoint to resume from, or initialise the run; tidy the workdir and say how it starts.

    Every worker of a multi-worker run restores the same checkpoint; only the chief writes the workdir.
    """
    strategy = strategy or tf.distribute.get_strategy()
    topo = topology(strategy)
    spec = checked.existing or dataclasses.replace(
        cfg.spec, created=time.time(), data_source=checked.loaded.source, data_fingerprint=checked.loaded.fingerprint,
        strategy=topo.strategy, replicas=topo.replicas, workers=topo.workers)
    train_state = TrainState(spec, strategy)
    resumed_from, state = find_start(cfg, train_state)
    start = int(train_state.step.numpy())
    if peers is not None:  # also a barrier: the chief tidies the workdir only once every worker has read it
        peers.same_start(start)
    if checked.existing is None and topo.chief:  # only now: a start that cannot restore --from leaves no run.json
        write_run(cfg.wd.storage, spec)
    leftovers = cfg.wd.storage.clean_leftovers() if topo.chief else []
    reporter.message(f"resumed from {Path(resumed_from).name} (step {start})" if resumed_from else "starting fresh")
    _initialise(cfg, checked, train_state, reporter)
    if leftovers:
        reporter.message(f"removed leftovers of an interrupted save: {', '.join(sorted(leftovers))}")
    saver = (_make_saves(cfg, checked, _make_saver(cfg, train_state, state, resumed_from, reporter), reporter)
             if topo.chief else distribute.ScratchSaver(cfg.workdir, train_state.checkpoint))
    data = checked.loaded.data
    reporter.message(f"data: {spec.dataset} from {data.source} (train {len(data.train)}, "
                     f"validation {len(data.validation)}, test {len(data.test)})")
    _announce_topology(checked.existing, topo, reporter)
    spent = spent_stop_request(cfg.wd.storage) if topo.chief else None
    if topo.chief:
        _announce_stop_request(cfg.wd.storage, start, spent, reporter)
    return Started(train_state, start, resumed_from, saver, spent)


def _announce_topology(existing: RunSpec | None, topo: Topology, reporter: Reporter) -> None:
    """Say how this start runs, and when the run's first start split the batch among another number of replicas."""
    reporter.message(topo.line())
    if existing is not None and existing.replicas and existing.replicas != topo.replicas:
        reporter.message(f"run.json records {existing.replicas} replica(s) ({existing.strategy}, "
                         f"{existing.workers} worker(s)) at the first start; this start runs {topo.replicas}: "
                         f"the global batch stays {existing.batch_size}")


def _initialise(cfg: TrainConfig, checked: Checked, train_state: TrainState, reporter: Reporter) -> None:
    """Apply --init-from at a workdir's first start and show its table; say so when a resume ignores it."""
    if cfg.init is not None and checked.init_plan is None:
        reporter.message("--init-from ignored: this run continues from its own checkpoints")
    if checked.init_plan is None:
        return
    warmstart.apply(checked.init_plan, {f"model/{k}": v for k, v in train_state.model.named_variables().items()},
                    cfg.init.weights if cfg.init else "ema")
    train_state.ema.reset()  # the shadows start from the restored weights, not from the random ones
    for line in checked.init_plan.table():
        reporter.message(line)


def _make_saver(cfg: TrainConfig, train_state: TrainState, state: State | None, resumed_from: str | None,
                reporter: Reporter) -> saver_lib.CheckpointSaver:
    """The saver for this run; first remove the checkpoints an interrupted save left unlisted."""
    saver = saver_lib.CheckpointSaver(cfg.wd, train_state.checkpoint, state=_initial_state(cfg.wd, state),
                                      keep=cfg.keep, keep_every_hours=cfg.keep_every_hours,
                                      anchor=train_state.spec.created, keep_pending=cfg.keep_pending, warn=warn)
    if state is None:  # without a state file, nothing tells which checkpoints are unlisted
        return saver
    gone = saver.remove_unlisted(frozenset({Path(resumed_from).name}) if resumed_from else frozenset())
    if gone:
        shown = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
        reporter.message(f"removed {len(gone)} checkpoint(s) that the state file does not list "
                         f"(left by an interrupted save): {shown}")
    return saver


def _make_saves(cfg: TrainConfig, checked: Checked, saver: saver_lib.CheckpointSaver,
                reporter: Reporter) -> save_modes.SyncSaves | save_modes.AsyncSaves:
    """The saves in the mode chosen at the checks; say so when the default async could not be used."""
    if checked.save_note:
        reporter.message(checked.save_note)
    kind = save_modes.AsyncSaves if checked.save_mode == save_modes.ASYNC else save_modes.SyncSaves
    return kind(saver, report=reporter.message)


# Phase 3: run. The inner loop does the math; the actions after each call do everything else.

@dataclasses.dataclass(frozen=True)
class Ran:
    """What `run_training` did."""

    step: int  # the last step trained
    last_saved: str | None  # prefix of the last checkpoint this run committed
    honoured: StopRequestId | None  # the id of the stop request this run stopped for


def run_training(cfg: TrainConfig, started: Started, data: datasets.Dataset, reporter: Reporter, stop: StopRequest,
                 *, chief: bool = True, peers: Peers | None = None) -> Ran:
    """Train from the start step to `cfg.steps` or a stop, running the actions after every call.

    `chief=False` is for a worker of a distributed run that is not its chief: it runs only the
    actions every worker takes part in, writes no heartbeat or TensorBoard log and leaves done.json.
    With `peers` (a multi-worker run) the stop requests go to `peers.requests`, and `stop` is set
    on every worker at once after the workers exchanged them.
    """
    displays, heartbeat = _open_displays(cfg, started, reporter, chief)
    saves = SaveCheckpoints(lambda step: _save(started.saver, started.train_state, step),
                            every=cfg.save_every, last_step=cfg.steps, stop=stop,
                            poll=started.saver.poll)
    stop_check = CheckStopRequest(lambda: early_stop_request(cfg.wd.storage, since_step=started.step,
                                                             spent=started.spent), peers.requests if peers else stop)
    actions = make_actions(saves=saves, stop_check=stop_check, displays=displays.reporters, chief=chief, agree=peers)
    try:
        displays.start(first_step=started.step, total_steps=cfg.steps)
        step = run_loop(cfg, started.train_state, data, actions, reporter, stop)
        honoured = stop_check.honoured.id if stop_check.honoured is not None else None
        if honoured and heartbeat is not None:  # the closing heartbeat keeps it on record
            heartbeat.spent = honoured
    finally:
        displays.close()
    return Ran(step, saves.last_saved, honoured)


def _open_displays(cfg: TrainConfig, started: Started, reporter: Reporter,
                   chief: bool) -> tuple[Tee, Heartbeat | None]:
    """The displays of the run: the reporter, and on the chief the heartbeat and TensorBoard; done.json goes."""
    if not chief:
        return Tee(reporter), None
    heartbeat = Heartbeat(cfg.wd.storage, spent=started.spent)
    # Written before done.json goes, so that a spent request stays on record if this run is killed.
    heartbeat.start(first_step=started.step, total_steps=cfg.steps)
    remove_done(cfg.wd.storage)
    local = cfg.wd.local_folder()
    if local is None:  # TF cannot write to a bucket here: a local folder, copied into it (common.storage.mirror)
        mirror = MirroredFolder(cfg.wd.storage, f"{TB_DIR}/train")
        return Tee(reporter, heartbeat, TensorBoardLog(mirror.path, mirror)), heartbeat
    return Tee(reporter, heartbeat, TensorBoardLog(local / TB_DIR / "train")), heartbeat


def run_loop(cfg: TrainConfig, train_state: TrainState, data: datasets.Dataset, actions: Sequence[Action],
             reporter: Reporter, stop: StopRequest) -> int:
    """The outer loop: call the inner loop for up to `--steps-per-loop` steps, then run `actions`; repeat.

    Returns:
      The last step.
    """
    step = int(train_state.step.numpy())
    spec = train_state.spec
    iterator = iter(distribute.distributed_batches(train_state.strategy, data.train, batch_size=spec.batch_size,
                                                   seed=spec.seed, start_step=step, prepare=spec.prepare))
    loops = {False: make_train_loop(train_state, spec.batch_size)}
    while step < cfg.steps and not stop:
        n = _call_size(cfg, spec.unfreeze_at, step)
        finetune = bool(spec.unfreeze_at) and step >= spec.unfreeze_at
        if finetune not in loops:
            loops[finetune] = make_train_loop(train_state, spec.batch_size, finetune=True)
            reporter.message(f"unfrozen at step {step}: every variable now trains at lr {spec.finetune_lr:g}")
        lr = spec.finetune_lr if finetune else float(train_state.learning_rate(step + n))
        out = _call(loops[finetune], iterator, step, n, lr)
        for action in actions:
            action(out)
        step = out.step
    return step


def _call_size(cfg: TrainConfig, unfreeze_at: int, step: int) -> int:
    """Steps for the next call: at most `--steps-per-loop`, ending at the next save, the last step or the unfreeze."""
    next_save = (step // cfg.save_every + 1) * cfg.save_every
    n = min(cfg.steps_per_loop, next_save - step, cfg.steps - step)
    if unfreeze_at and step < unfreeze_at:
        n = min(n, unfreeze_at - step)
    return n


def _call(loop: Any, iterator: Any, step: int, n: int, lr: float) -> LoopOutput:
    """Run `n` steps from `step` in one call of the inner loop and read its outputs into Python."""
    began = time.perf_counter()
    out = loop(iterator, tf.constant(n))
    all_finite, loss = bool(out["all_finite"]), float(out["loss"])
    return LoopOutput(first_step=step, step=step + n, loss=loss, all_finite=all_finite,
                      steps_per_sec=n / (time.perf_counter() - began), lr=lr)


def _save(saver: save_modes.SyncSaves | save_modes.AsyncSaves | distribute.ScratchSaver, train_state: TrainState,
          step: int) -> str:
    """Commit a checkpoint for `step`, unless a weight or shadow is not finite."""
    if not train_state.all_finite():
        raise DivergedError(f"non-finite weights at step {step}; not saved")
    return str(saver.save(step))


@contextlib.contextmanager
def pending_saves(saver: save_modes.SyncSaves | save_modes.AsyncSaves | distribute.ScratchSaver) -> Iterator[None]:
    """Wait for the pending background save when the block ends, however it ends.

    Its failure is raised (exit code 5) when the block ended normally (the end of training or a
    signal); when the block raised, the failure is printed as a warning and the block's error goes on.
    """
    try:
        yield
    except BaseException:
        try:
            saver.close()
        except WorkdirIOError as e:
            warn(str(e))
        raise
    saver.close()


# The files this program shares with the evaluator (typed in common.run.protocol): stop_request.json
# (read) and done.json (read, removed at the start of a run, written at its end). Only the
# functions below touch them.

def remove_done(storage: Storage) -> None:
    """Remove done.json: from now on the run is not finished."""
    storage.delete(DONE_FILE)


def early_stop_request(storage: Storage, *, since_step: int,
                       spent: StopRequestId | None = None) -> EarlyStopRequest | None:
    """An evaluator's stop request made at or after `since_step` and not spent already, if there is one."""
    request = EarlyStopRequest.read(storage)
    if request is None or request.step is None or request.step < since_step:
        return None
    return None if request.id == spent else request


def spent_stop_request(storage: Storage) -> StopRequestId | None:
    """The id of the workdir's stop request if a trainer already ended the run for it, or after it.

    A request is honoured once: done.json (or, after a later start removed it, heartbeat.json)
    records the one a run stopped for, and a run that finished at or past a request's step ended
    after it anyway. Honouring it again would end every extended run at once.
    """
    request = EarlyStopRequest.read(storage)
    if request is None:
        return None
    done = TrainingDone.read(storage) or TrainingDone()
    beat = TrainerHeartbeat.read(storage) or TrainerHeartbeat()
    if request.id in (done.spent_stop_request, beat.spent_stop_request):
        return request.id
    if request.step is not None and done.step is not None and request.step <= done.step:
        return request.id
    return None


def _announce_stop_request(storage: Storage, start: int, spent: StopRequestId | None, reporter: Reporter) -> None:
    """Say why the workdir's stop request will not stop this run, if it will not."""
    request = EarlyStopRequest.read(storage)
    if request is None:
        return
    if request.step is None or request.step < start:
        reporter.message(f"ignoring the evaluator's stop request of step {request.step} (before step {start})")
    elif spent is not None:
        reporter.message(f"ignoring the evaluator's stop request of step {request.step}: already spent "
                         "(the run ended at or after it)")


# Phase 4: finish.

def finish(cfg: TrainConfig, started: Started, ran: Ran, data: datasets.Dataset, reporter: Reporter,
           stop: StopRequest, *, chief: bool = True) -> TrainResult:
    """Say how the run ended; unless a signal ended it, evaluate the EMA weights and write done.json (chief only)."""
    final = ran.last_saved or started.resumed_from
    if stop and not stop.finish:
        reporter.message(f"stopped by {stop.reason} at step {ran.step}; saved {Path(final or '-').name}")
        return TrainResult(started.step, ran.step, started.resumed_from, stop.reason, final, {})
    if not chief:
        reporter.message(f"finished at step {ran.step}; the chief evaluates the EMA weights")
        return TrainResult(started.step, ran.step, started.resumed_from, stop.reason, final, {})
    if stop:
        reporter.message(f"stopped early at step {ran.step}: {stop.reason}; saved {Path(final or '-').name}")
    metrics = final_metrics(started.train_state, data)
    _report_final(reporter, ran.step, metrics)
    # The request this run stopped for, else the one it found spent: neither stops a later run.
    TrainingDone(step=ran.step, checkpoint=Path(final or "").name, time=time.time(), stop_reason=stop.reason,
                 ema_metrics=metrics, spent_stop_request=ran.honoured or started.spent).write(cfg.wd.storage)
    cfg.wd.announce(f"the trainer finished at step {ran.step}")  # for a watcher that polls the state file alone
    return TrainResult(started.step, ran.step, started.resumed_from, stop.reason, final, metrics)


def final_metrics(train_state: TrainState, data: datasets.Dataset) -> dict[str, Any]:
    """Evaluate the EMA weights on the validation and test splits."""
    model = build_model(train_state.spec)
    train_state.ema.copy_to(model)
    evaluate = Evaluation(model, train_state.spec.prepare)
    return {split: evaluate(data.split(split)) for split in ("validation", "test")}


def _report_final(reporter: Reporter, step: int, metrics: dict[str, Any]) -> None:
    """Print the run's last line: the EMA weights' accuracy and loss on both held-out splits."""
    reporter.message(log_line("final", step=step, weights="ema",
                              validation_accuracy=round(metrics["validation"]["accuracy"], 4),
                              test_accuracy=round(metrics["test"]["accuracy"], 4),
                              validation_loss=metrics["validation"]["loss"], test_loss=metrics["test"]["loss"]))


def train(cfg: TrainConfig, *, reporter: Reporter | None = None, stop: StopRequest | None = None,
          strategy: tf.distribute.Strategy | None = None) -> TrainResult:
    """Train (or resume) the run in `cfg.workdir` and return what happened.

    Every check that can reject the start runs before the workdir is created or written. Under a
    multi-worker `strategy` every worker calls this; only the chief takes the lock and writes.

    Raises:
      UsageError, DataNotFoundError, CheckpointError, DivergedError, WorkdirIOError, WorkerLostError: see README.
    """
    strategy = strategy or tf.distribute.get_strategy()
    topo = topology(strategy)
    checked = check_inputs(cfg, topo)
    reporter = reporter or make_reporter(cfg.progress, cfg.log_every)
    stop = stop if stop is not None else StopRequest()  # an unset StopRequest is falsy: `or` would drop it
    peers = Peers(strategy, stop) if topo.workers > 1 else None
    if topo.chief:
        cfg.wd.storage.create()  # a local folder and its parents; a bucket's prefix needs none
    lock = WorkdirLock(cfg.wd.storage) if topo.chief else contextlib.nullcontext()
    with lock, stop_on_signals(peers.requests if peers else stop), lost_worker_errors(topo):
        started = restore_or_initialise(cfg, checked, reporter, strategy, peers)
        with pending_saves(started.saver):
            ran = run_training(cfg, started, checked.loaded.data, reporter, stop, chief=topo.chief, peers=peers)
        return finish(cfg, started, ran, checked.loaded.data, reporter, stop, chief=topo.chief)
