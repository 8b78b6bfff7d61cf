"""Names of the files the two programs share inside a workdir, and of the keys inside a checkpoint.

What the shared files hold, and their typed reads and writes, is in `common.run.protocol`.
"""

from __future__ import annotations

from pathlib import Path

STATE_FILE = "checkpoint"  # TF's state file: the checkpoint to restore, and every one kept (common.checkpoint)
CHECKPOINT_PREFIX = "model"  # model-<step>.index, model-<step>.data-*: one checkpoint (common.checkpoint.checkpoints)
META_SUFFIX = ".meta"  # the meta graph a TF1 `tf.train.Saver` writes beside each checkpoint

# Object paths inside a checkpoint (TF appends /.ATTRIBUTES/VARIABLE_VALUE to form each tensor key).
STEP_KEY = "global_step"  # the training step (int64)
MODEL_KEY = "model"  # model/<layer>/<kernel|bias>: the raw weights
EMA_KEY = "ema"  # ema/<layer>/<kernel|bias>: their exponential moving averages
OPTIMIZER_KEY = "optimizer"  # optimizer/...: its slots

RUN_FILE = "run.json"  # what the run was trained with (common.run.spec)
DONE_FILE = "done.json"  # written by the trainer when it reached --steps
HEARTBEAT_FILE = "heartbeat.json"  # the trainer's last step, speed and time, rewritten about once a second
EVAL_DIR = "eval"  # everything the evaluator writes
LEDGER_FILE = "results.jsonl"  # eval/results.jsonl: one JSON object per evaluation
STOP_REQUEST_FILE = "stop_request.json"  # written by the evaluator (--patience) to stop the trainer early
BEST_LINK = "best"  # eval/best -> eval/best-<step>-<id>/: the best checkpoint's files and its best.json
BEST_JSON = "best.json"  # eval/best.json -> best/best.json, so both always change together
LEASE_DIR = "leases"  # eval/leases/<checkpoint>@<pid>: checkpoints an evaluator is reading
# eval/leases/.evaluator@<pid>: an evaluator watching the workdir (the trainer's --keep-pending keeps
# unevaluated checkpoints while one is)
EVALUATOR_LEASE = ".evaluator"
CLAIMS_DIR = "claims"  # eval/claims/<checkpoint>: the one evaluator evaluating it (a lock, gone after)
BEST_LOCK = ".best.lock"  # eval/.best.lock: held around compare-and-promote and the start-up clean
TB_DIR = "tb"  # TensorBoard logs: tb/train from the trainer, tb/eval from the evaluator


def lease_path(workdir: Path, checkpoint: str, pid: int) -> Path:
    """The lease file an evaluator holds while it reads `checkpoint` (a local workdir's layout)."""
    return workdir / EVAL_DIR / LEASE_DIR / f"{checkpoint}@{pid}"
