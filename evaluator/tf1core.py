"""The evaluation core for TF1 `tf.train.Saver` workdirs: the checkpoint's own meta graph, no model code.

`GraphEvaluator` keeps the contract of `evaluator.core`: checkpoint names in, ledger records out
(ok, gone, error, failed), read from private hard-linked snapshots. Each snapshot's `.meta` is
imported (the graph of the previous checkpoint is reused while the `.meta` bytes are the same),
then its EMA shadows or raw variables are restored and the split is fed through `--input`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from common.checkpoint.checkpoints import CheckpointError, State
from common.checkpoint.tf1graph import GraphFlagError, GraphFlags, SaverGraph, meta_of, read_saver_step, saver_format
from common.data import datasets
from common.errors import UsageError
from common.run.ledger import Record
from common.run.workdir import Workdir
from evaluator.core import SnapshotEvaluator
from evaluator.sets import EvalSet

# A Saver writes the state file first and the `.meta` right after it: wait this long for the `.meta`
# of a checkpoint that is listed already, before calling it missing.
META_WAIT_SECS = 5.0
META_POLL_SECS = 0.02


class WrongWorkdirKind(UsageError):
    """A TF2 object-based workdir given with --tf1-graph, or a TF1 Saver workdir without it."""


# Flags that no later state of the workdir makes right: the watch loop stops on them as --once does.
FLAG_ERRORS = (GraphFlagError, WrongWorkdirKind)


def listed_prefix(workdir: Workdir, state: State | None) -> Path | None:
    """The newest listed checkpoint of the workdir whose files are there, or None (a local workdir's)."""
    if state is None or workdir.local_folder() is None:  # TF1 Saver workdirs are local (EvalConfig)
        return None
    for name in reversed([*state.paths, state.latest or ""]):
        if name and workdir.inside(name) and workdir.has_checkpoint(Path(name).name):
            return Path(workdir.resolve(name))
    return None


def check_kind(workdir: Workdir, *, tf1: bool) -> Path | None:
    """Refuse a workdir whose checkpoints are not of the kind the flags say; return the newest one there.

    Raises:
      WrongWorkdirKind: with --tf1-graph, object-based TF2 checkpoints; without it, TF1 Saver ones.
      CheckpointError: the state file is unreadable.
    """
    prefix = listed_prefix(workdir, workdir.state())
    if prefix is None:
        return None
    kind = saver_format(prefix)
    if tf1 and kind == "tf2":
        raise WrongWorkdirKind(f"{workdir}: {prefix.name} is a TF2 object-based checkpoint (tf.train.Checkpoint), "
                               "not a TF1 Saver one: drop --tf1-graph, --input, --output and --dataset")
    if not tf1 and kind == "tf1":
        raise WrongWorkdirKind(f"{workdir}: {prefix.name} is a TF1 tf.train.Saver checkpoint and the workdir has "
                               "no run.json: watch it with --tf1-graph --input NAME --output NAME --dataset NAME")
    return prefix


class GraphEvaluator(SnapshotEvaluator):
    """Evaluate TF1 Saver checkpoints through their meta graph, with EMA and/or raw weights."""

    def __init__(self, workdir: Workdir, flags: GraphFlags, sets: tuple[EvalSet, ...], *, weights: str) -> None:
        super().__init__(workdir, sets, weights=weights)
        self.flags = flags
        self.class_names = flags.class_names()
        self._graph: SaverGraph | None = None
        self._meta_digest = b""

    def check(self, prefix: Path) -> None:
        """Import checkpoint `prefix`'s meta graph now, so that flags that do not fit fail before any evaluation.

        Raises:
          GraphFlagError: a tensor is not in the graph, or does not fit the images or the classes.
          CheckpointError: the `.meta` is missing or unreadable.
        """
        self._graph_of(prefix)

    def before_pin(self, name: str) -> None:
        """Wait briefly for the `.meta` a Saver writes after the checkpoint (see `_await_meta`)."""
        if self.workdir.inside(name):
            _await_meta(Path(self.workdir.resolve(name)))

    def _restore_weights(self, prefix: Path, kind: str) -> int | None:
        try:
            graph = self._graph_of(prefix)
        except GraphFlagError as e:  # this checkpoint's graph differs from the one the flags were checked on
            raise CheckpointError(str(e)) from None
        step = read_saver_step(prefix)
        graph.restore(prefix, kind)
        return step

    def _measure(self, eval_set: EvalSet) -> Record:
        assert self._graph is not None  # _restore_weights imported it
        return dict(self._graph.metrics(eval_set.split))

    def _graph_of(self, prefix: Path) -> SaverGraph:
        """The imported graph of `prefix`'s `.meta`, reused while the file's bytes stay the same."""
        meta = meta_of(prefix)
        try:
            data = meta.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{meta.name} is missing: evaluating a TF1 Saver checkpoint needs the meta graph "
                                  "it was saved with (Saver.save(..., write_meta_graph=True), the default)") from None
        except OSError as e:
            raise CheckpointError(f"{meta.name}: cannot read ({e.strerror or e})") from e
        digest = hashlib.sha256(data).digest()
        if self._graph is None or digest != self._meta_digest:
            graph = SaverGraph(meta, self.flags)
            if self._graph is not None:
                self._graph.close()
            self._graph, self._meta_digest = graph, digest
        return self._graph

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()


def _await_meta(prefix: Path) -> None:
    """Wait (briefly) for the `.meta` of a checkpoint whose `.index` is there: the Saver writes it last."""
    deadline = time.monotonic() + META_WAIT_SECS
    while not meta_of(prefix).exists() and Path(f"{prefix}.index").exists() and time.monotonic() < deadline:
        time.sleep(META_POLL_SECS)


def prepare(workdir: Workdir, flags: GraphFlags, *, splits: tuple[str, ...], weights: str,
            data_dir: str | None) -> GraphEvaluator:
    """The core for a --tf1-graph workdir, its flags checked on the newest checkpoint's graph.

    A state file that lists only checkpoints that are not there (deleted, or outside the workdir)
    gives a core that records them as `gone` or `error`, with no graph to check the flags on.

    Raises:
      WrongWorkdirKind, GraphFlagError: flags that no later state of the workdir makes right.
      UsageError: no checkpoint yet (the watch loop waits for one).
      DataNotFoundError, DataFormatError: the dataset.
    """
    if workdir.state() is None:
        raise UsageError(f"{workdir}: no TF1 Saver checkpoint yet (no state file)")
    prefix = check_kind(workdir, tf1=True)
    if flags.dataset is None:
        raise UsageError("--tf1-graph needs --dataset: the workdir has no run.json to say which")
    data = datasets.load(flags.dataset, data_dir)
    core = GraphEvaluator(workdir, flags, tuple(EvalSet(name, data.split(name)) for name in splits), weights=weights)
    if prefix is not None:
        _await_meta(prefix)
        core.check(prefix)
    return core
