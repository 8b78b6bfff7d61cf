"""The inner loop: model, optimizer, EMA and the `tf.function` that runs many steps per call.

Everything here is built under `strategy.scope()` and stepped through `strategy.run`, so a
`tf.distribute` strategy can wrap it; with the default strategy it is a plain single-device loop.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import tensorflow as tf

from common.checkpoint import checkpoints
from common.errors import UsageError
from common.model import models, registry
from common.model.ema import MovingAverage
from common.run.spec import RunSpec

_FIRST_REPLICA = tf.VariableAggregation.ONLY_FIRST_REPLICA


class Adam(tf.Module):
    """Adam with slots under readable keys (`optimizer/m/conv1/kernel`), one fused op per variable."""

    def __init__(self, named: dict[str, tf.Variable], *, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-7) -> None:
        super().__init__(name="optimizer")
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, aggregation=_FIRST_REPLICA)
        self.m = models.as_tree({k: tf.Variable(tf.zeros_like(v), trainable=False) for k, v in named.items()})
        self.v = models.as_tree({k: tf.Variable(tf.zeros_like(v), trainable=False) for k, v in named.items()})

    def apply(self, grads: list[tf.Tensor], paths: list[str], variables: list[tf.Variable], lr: tf.Tensor) -> None:
        """Apply one update to `variables`, whose model paths (`conv1/kernel`) are `paths`."""
        t = tf.cast(self.iterations + 1, tf.float32)
        b1_power, b2_power = tf.pow(self.beta1, t), tf.pow(self.beta2, t)
        for path, grad, var in zip(paths, grads, variables, strict=True):
            tf.raw_ops.ResourceApplyAdam(
                var=var.handle, m=models.tree_get(self.m, path).handle, v=models.tree_get(self.v, path).handle,
                beta1_power=b1_power, beta2_power=b2_power, lr=lr,
                beta1=self.beta1, beta2=self.beta2, epsilon=self.epsilon, grad=grad,
            )
        self.iterations.assign_add(1)


def frozen_keys(names: Iterable[str], patterns: tuple[str, ...]) -> frozenset[str]:
    """The variable keys (`conv1/kernel`) that `--freeze` patterns (`model/conv*`) select.

    Raises:
      UsageError: a pattern matches no variable.
    """
    names = list(names)
    unused = [p for p in patterns if not any(fnmatch.fnmatchcase(f"model/{k}", p) for k in names)]
    if unused:
        raise UsageError(f"--freeze {unused[0]}: matches no model variable (they are model/<path>, "
                         f"e.g. model/{next(iter(names), 'fc1/kernel')})")
    return frozenset(k for k in names if any(fnmatch.fnmatchcase(f"model/{k}", p) for p in patterns))


class TrainState:
    """The model, its EMA, the optimizer and the step counter, tracked by one checkpoint."""

    def __init__(self, spec: RunSpec, strategy: tf.distribute.Strategy) -> None:
        self.spec = spec
        self.strategy = strategy
        with strategy.scope():
            self.model = registry.build(spec.model, num_classes=spec.num_classes, input_shape=spec.input.shape,
                                      seed=spec.seed)
            self.ema = MovingAverage(self.model, decay=spec.ema_decay)
            self.optimizer = Adam({k: v for k, v in self.model.named_variables().items() if v.trainable})
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, aggregation=_FIRST_REPLICA)
        self.frozen = frozen_keys(self.model.named_variables(), spec.freeze)
        self.checkpoint = tf.train.Checkpoint(**{
            checkpoints.STEP_KEY: self.step,
            # Keyed by each variable's own path (`model/conv1/kernel`), like the EMA and the slots.
            checkpoints.MODEL_KEY: models.as_tree(self.model.named_variables()),
            checkpoints.EMA_KEY: self.ema.tree,
            checkpoints.OPTIMIZER_KEY: self.optimizer,
        })

    def learning_rate(self, step: tf.Tensor) -> tf.Tensor:
        """`lr * lr_decay_rate ** (step / lr_decay_steps)`."""
        spec = self.spec
        exponent = tf.cast(step, tf.float32) / float(spec.lr_decay_steps)
        return spec.lr * tf.pow(spec.lr_decay_rate, exponent)

    def all_finite(self) -> bool:
        """Whether every weight and shadow is finite (checked before a checkpoint is committed)."""
        tensors = [v for v, _ in self.ema.pairs] + [s for _, s in self.ema.pairs]
        return bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors]))


def _cross_entropy(labels: tf.Tensor, logits: tf.Tensor, smoothing: float) -> tf.Tensor:
    """Per-example cross-entropy against the labels, each moved `smoothing` of the way to uniform."""
    if not smoothing:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    classes = logits.shape[-1]
    targets = tf.one_hot(labels, classes) * (1.0 - smoothing) + smoothing / classes
    return tf.nn.softmax_cross_entropy_with_logits(targets, logits)


def make_train_loop(state: TrainState, global_batch_size: int, *, use_ema: bool = True,
                    jit_compile: bool = False, finetune: bool = False) -> Any:
    """Build `loop(iterator, n) -> {"loss", "all_finite"}`: n steps in one `tf.function` call.

    Frozen variables (`--freeze`) are left out of the gradient, the optimizer and the EMA update,
    unless `finetune` (after `--unfreeze-at`), when everything trains at `--finetune-lr`.
    `use_ema=False` and `jit_compile=True` exist for the benchmarks (`make bench`), which measure
    what the EMA costs and what XLA would give; training always keeps the EMA.
    """
    named = state.model.named_variables()
    # Non-trainable variables (batch norm's moving statistics) change in the forward pass, not here.
    paths = [k for k, v in named.items() if v.trainable and (finetune or k not in state.frozen)]
    variables = [named[k] for k in paths]
    kernels = [v for k, v in named.items() if k.endswith("/kernel")]
    strategy = state.strategy

    def replica_step(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            logits = state.model(images, training=True)
            per_example = _cross_entropy(labels, logits, state.spec.label_smoothing)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
            if state.spec.l2 > 0:
                penalty = state.spec.l2 * tf.add_n([tf.nn.l2_loss(k) for k in kernels])
                loss += penalty / strategy.num_replicas_in_sync
        grads = tape.gradient(loss, variables)
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        step = state.step.read_value()
        lr = tf.constant(state.spec.finetune_lr) if finetune else state.learning_rate(step)
        state.optimizer.apply(grads, paths, variables, lr)
        if use_ema:
            state.ema.update(step, only=paths)
        state.step.assign_add(1)
        return loss

    step_fn = tf.function(replica_step, jit_compile=True) if jit_compile else replica_step

    @tf.function
    def loop(iterator: Any, n: tf.Tensor) -> dict[str, tf.Tensor]:
        total = tf.constant(0.0)
        finite = tf.constant(True)
        for _ in tf.range(n):
            per_replica = strategy.run(step_fn, args=next(iterator))
            loss = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            total += loss
            finite = tf.logical_and(finite, tf.math.is_finite(loss))
        return {"loss": total / tf.cast(n, tf.float32), "all_finite": finite}

    return loop
