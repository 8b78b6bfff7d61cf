"""The evaluator's TensorBoard scalars under `tb/eval`, on the trainer's step axis."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from common.run.protocol import LedgerRow
from common.storage.mirror import MirroredFolder


class TensorBoardSink:
    """Write `<set>/<metric>/<weights>` for each ok record: accuracy, loss, top-k accuracy and users' metrics.

    One tag per evaluation set (`validation/accuracy/ema`, `test/accuracy/ema`, `shifted/loss/ema`).
    """

    def __init__(self, logdir: Path | None, mirror: MirroredFolder | None = None) -> None:
        """`logdir` None writes nothing. For a bucket workdir, which TF cannot write to here, `logdir`
        is `mirror.path`: a local folder copied into the bucket (`common.storage.mirror`)."""
        self.logdir = logdir
        self.mirror = mirror
        self._writer: tf.summary.SummaryWriter | None = None

    def write(self, rows: list[LedgerRow]) -> None:
        ok = [r for r in rows if r.status == "ok" and r.step is not None and r.accuracy is not None]
        if not ok or self.logdir is None:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.logdir))
        with self._writer.as_default():
            for r in ok:
                extra = r.fields.get("metrics")
                scalars = {"accuracy": r.accuracy, "loss": r.loss, **(extra if isinstance(extra, dict) else {})}
                for metric, value in scalars.items():
                    if value is not None:
                        tf.summary.scalar(f"{r.split}/{metric}/{r.weights}", value, step=int(r.step or 0))
        self._writer.flush()
        if self.mirror is not None and self.mirror.due():
            self.mirror.sync()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None
