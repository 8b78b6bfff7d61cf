"""The evaluator's TensorBoard scalars under `tb/eval`, on the trainer's step axis."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from evaluator.ledger import Record


class TensorBoardSink:
    """Write `<split>/accuracy/<weights>` and `<split>/loss/<weights>` for each ok record."""

    def __init__(self, logdir: Path | None) -> None:
        """`logdir` None (a bucket workdir, which TF cannot write to here) writes nothing."""
        self.logdir = logdir
        self._writer: tf.summary.SummaryWriter | None = None

    def write(self, records: list[Record]) -> None:
        ok = [r for r in records if r.get("status") == "ok" and r.get("step") is not None]
        if not ok or self.logdir is None:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.logdir))
        with self._writer.as_default():
            for r in ok:
                for metric in ("accuracy", "loss"):
                    tf.summary.scalar(f"{r['split']}/{metric}/{r['weights']}", r[metric], step=int(r["step"]))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
