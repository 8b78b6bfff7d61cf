"""`TF_CONFIG`, the cluster description every process of a TensorFlow job gets, as both programs read it.

A job spec (Kubeflow's TFJob, TF's own guides) gives each process the same `cluster` and its own
`task`: `chief` and `worker` tasks train together, an `evaluator` task evaluates beside them as a
cluster of its own. So the trainer drops the `evaluator` job from the cluster it joins, and the
evaluator, seeing its own task type, joins nothing. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from common.errors import UsageError

EVALUATOR = "evaluator"


@dataclasses.dataclass(frozen=True)
class Task:
    """This process's task in `TF_CONFIG`."""

    type: str  # chief, worker, ps or evaluator
    index: int
    cluster: Mapping[str, Sequence[str]]  # job name -> addresses (an evaluator's may be empty)


def read_task(text: str | None) -> Task | None:
    """The task `TF_CONFIG` names, or None when it is unset or empty.

    Raises:
      UsageError: it is not a JSON object with a task of a type and an index.
    """
    if not text or not text.strip():
        return None
    try:
        config = json.loads(text)
        task = config["task"]
        kind, index = str(task["type"]), int(task["index"])
        cluster = config.get("cluster") or {}
        if not isinstance(cluster, dict) or not all(isinstance(v, list) for v in cluster.values()):
            raise TypeError("`cluster` must map job names to lists of addresses")
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"TF_CONFIG ({text[:200]!r}) is not a JSON object with a task (type and index): {e}") from e
    return Task(type=kind, index=index, cluster=cluster)


def without_evaluator(text: str) -> str:
    """`TF_CONFIG` as the training processes join it: without the `evaluator` job, a cluster of its own."""
    config: dict[str, Any] = json.loads(text)
    cluster = dict(config.get("cluster") or {})
    if EVALUATOR not in cluster:
        return text
    del cluster[EVALUATOR]
    return json.dumps(config | {"cluster": cluster})


def tf_config(cluster: Mapping[str, Sequence[str]], kind: str, index: int) -> str:
    """The `TF_CONFIG` of task `kind` `index` of `cluster`."""
    return json.dumps({"cluster": {k: list(v) for k, v in cluster.items()}, "task": {"type": kind, "index": index}})
