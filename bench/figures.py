"""The benchmark figures B1-B7: this project against the tools people would use instead, in one run.

Each function measures one figure several times and returns the raw samples; `bench.run` turns
them into medians, spreads and ratios. Timings exclude tracing/compilation (a warm-up runs first).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from common import checkpoints, datasets
from common.evaluation import Evaluation
from common.runconfig import RunSpec
from trainer.inputs import train_dataset
from trainer.saver import CheckpointSaver
from trainer.step import TrainState, make_train_loop

REPO = Path(__file__).resolve().parents[1]
BATCH = 64


def spec_for(model: str, dataset: str) -> RunSpec:
    return RunSpec(dataset=dataset, model=model, batch_size=BATCH, lr=1e-3, lr_decay_rate=1.0, lr_decay_steps=1000,
                   l2=0.0, ema_decay=0.999, seed=0, class_names=datasets.get_info(dataset).class_names)


def ours_images_per_sec(data: datasets.Dataset, spec: RunSpec, steps: int, *, use_ema: bool = True,
                        save_every: int = 0, jit: bool = False, steps_per_loop: int = 20) -> float:
    """Training throughput of this project's loop (optionally saving every `save_every` steps)."""
    state = TrainState(spec, tf.distribute.get_strategy())
    loop = make_train_loop(state, BATCH, use_ema=use_ema, jit_compile=jit)
    iterator = iter(train_dataset(data.train, batch_size=BATCH, seed=0, start_step=0))
    loop(iterator, tf.constant(steps_per_loop))  # trace and warm up
    with tempfile.TemporaryDirectory() as tmp:
        saver = CheckpointSaver(Path(tmp), state.checkpoint, state=checkpoints.State(), keep=5, keep_every_hours=0,
                                anchor=time.time())
        if save_every:
            saver.save(0)  # traces the save function once, as the warm-up step traced the loop
        began, done = time.perf_counter(), 0
        while done < steps:
            n = min(steps_per_loop, steps - done)
            out = loop(iterator, tf.constant(n))
            done += n
            if save_every and done % save_every == 0:
                saver.save(done)
        float(out["loss"])  # wait for the last step
        return steps * BATCH / (time.perf_counter() - began)


def keras_model(num_classes: int = 10) -> Any:
    import keras

    return keras.Sequential([
        keras.layers.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 5, padding="same", activation="relu"), keras.layers.MaxPooling2D(2, padding="same"),
        keras.layers.Conv2D(36, 5, padding="same", activation="relu"), keras.layers.MaxPooling2D(2, padding="same"),
        keras.layers.Flatten(), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(num_classes),
    ])


class _Timer:
    """A Keras callback that times batches after the first `skip` (tracing and warm-up)."""

    def __new__(cls, skip: int) -> Any:
        import keras

        class Timer(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.batches, self.began, self.ended = 0, 0.0, 0.0

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                self.batches += 1
                if self.batches == skip:
                    self.began = time.perf_counter()
                self.ended = time.perf_counter()

        return Timer()


def keras_fit_images_per_sec(data: datasets.Dataset, steps: int, *, jit_compile: Any) -> float:
    """`keras.Model.fit` throughput on the same architecture, batch size and data."""
    import keras

    model = keras_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    skip = 20
    reps = -(-(steps + skip) * BATCH // len(data.train))  # enough data for one epoch of steps + skip
    x = np.tile(data.train.images[..., None].astype(np.float32) / 255.0, (reps, 1, 1, 1))
    y = np.tile(data.train.labels, reps)
    timer = _Timer(skip)
    model.fit(x, y, batch_size=BATCH, epochs=1, steps_per_epoch=steps + skip, verbose=0,
              callbacks=[timer], shuffle=True)
    return (timer.batches - skip) * BATCH / (timer.ended - timer.began)


def eval_images_per_sec(data: datasets.Dataset, spec: RunSpec, repeats: int) -> tuple[list[float], list[float]]:
    """Validation-split throughput: this project's Evaluation against `keras.Model.evaluate`, same weights."""
    import keras

    state = TrainState(spec, tf.distribute.get_strategy())
    ours = Evaluation(state.model)
    kmodel = keras_model(spec.num_classes)
    for layer, name in zip([kmodel.layers[i] for i in (0, 2, 5, 6)], ("conv1", "conv2", "fc1", "fc2"), strict=True):
        mine = state.model.layer(name)
        layer.set_weights([mine.kernel.numpy(), mine.bias.numpy()])
    kmodel.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                   jit_compile=False)
    x = data.validation.images[..., None].astype(np.float32) / 255.0
    ours(data.validation)
    kmodel.evaluate(x, data.validation.labels, batch_size=1000, verbose=0)
    mine_s, keras_s = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        ours(data.validation)
        mine_s.append(len(data.validation) / (time.perf_counter() - began))
        began = time.perf_counter()
        kmodel.evaluate(x, data.validation.labels, batch_size=1000, verbose=0)
        keras_s.append(len(data.validation) / (time.perf_counter() - began))
    return mine_s, keras_s


def eval_batch_sizes(data: datasets.Dataset, spec: RunSpec, sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Experiment: our evaluation throughput (images/s) at several batch sizes."""
    state = TrainState(spec, tf.distribute.get_strategy())
    out = {}
    for size in sizes:
        run = Evaluation(state.model, batch_size=size)
        run(data.validation)
        samples = []
        for _ in range(repeats):
            began = time.perf_counter()
            run(data.validation)
            samples.append(len(data.validation) / (time.perf_counter() - began))
        out[str(size)] = statistics.median(samples)
    return out


ITERATOR_CONSUMER = """
import sys, time, json
import tensorflow as tf
for path in tf.train.checkpoints_iterator(sys.argv[1], min_interval_secs=1, timeout=float(sys.argv[2])):
    print(json.dumps({"path": path, "seen": time.time()}), flush=True)
"""


def detection_latency(workdir: Path, data_dir: str | None, *, model: str, steps: int,
                      save_every: int) -> dict[str, Any]:
    """State-file commit -> restore start for our evaluator, and commit -> yield for checkpoints_iterator."""
    data = ["--data-dir", data_dir] if data_dir else []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    evaluator = subprocess.Popen([sys.executable, "-m", "evaluator.cli", "--workdir", str(workdir),
                                  "--exit-when-done", "--progress", "plain", *data], stdout=subprocess.DEVNULL, env=env,
                                 cwd=REPO)
    iterator_log = workdir.parent / "iterator.jsonl"
    with open(iterator_log, "w") as log:
        iterator = subprocess.Popen([sys.executable, "-c", ITERATOR_CONSUMER, str(workdir), "5"], stdout=log,
                                    stderr=subprocess.DEVNULL, env=env)
        subprocess.run([sys.executable, "-m", "trainer.cli", "--workdir", str(workdir), "--model", model,
                        "--steps", str(steps), "--save-every", str(save_every), "--keep", "0", "--progress", "plain",
                        "--log-every", str(10**9), *data], check=True, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
        evaluator.wait(timeout=600)
        iterator.wait(timeout=600)
    state = checkpoints.read_state(workdir)
    assert state is not None
    committed = {Path(p).name: state.timestamp_of(p) for p in state.paths}
    rows = [json.loads(line) for line in (workdir / "eval" / "results.jsonl").read_text().splitlines()]
    ours = [1000 * (r["started"] - r["committed"]) for r in rows if r["status"] == "ok"]
    theirs = [1000 * (json.loads(line)["seen"] - committed[Path(json.loads(line)["path"]).name])
              for line in iterator_log.read_text().splitlines()]
    return {"ours_ms": ours, "iterator_ms": theirs, "checkpoints": len(committed),
            "iterator_yielded": len(theirs), "ours_evaluated": len(ours)}


MEMORY_PROBE = """
import json, sys, resource
from pathlib import Path
from common.tfenv import quiet_import_tensorflow
quiet_import_tensorflow()
from evaluator.session import EvalConfig, Session
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
session = Session(EvalConfig(workdir=Path(sys.argv[1]), data_dir=sys.argv[2] or None))
todo = session.pending(session.listed())
session.evaluate(todo[0])
first = rss_mb()
for cand in todo[1:]:
    session.evaluate(cand)
session.close()
print(json.dumps({"first_mb": first, "last_mb": rss_mb(), "evaluated": len(todo)}))
"""


def evaluator_memory(workdir: Path, data_dir: str | None, *, model: str, count: int) -> dict[str, Any]:
    """RSS of one evaluator process after its first evaluation and after `count`."""
    data = ["--data-dir", data_dir] if data_dir else []
    subprocess.run([sys.executable, "-m", "trainer.cli", "--workdir", str(workdir), "--model", model, "--steps",
                    str(count * 5), "--save-every", "5", "--keep", "0", "--steps-per-loop", "5", "--progress", "plain",
                    "--log-every", str(10**9), *data], check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(workdir), data_dir or ""], check=True,
                         capture_output=True, text=True, cwd=REPO)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def once_wall_secs(workdir: Path, data_dir: str | None, repeats: int) -> list[float]:
    """Wall time of a cold `evaluator --once` on a workdir with nothing pending."""
    data = ["--data-dir", data_dir] if data_dir else []
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "evaluator.cli", "--workdir", str(workdir), "--once", "--json", *data],
                       check=True, stdout=subprocess.DEVNULL, cwd=REPO)
        times.append(time.perf_counter() - began)
    return times


def time_to_accuracy(workdir: Path, data_dir: str | None, *, model: str, target: float, max_steps: int,
                     save_every: int) -> float | None:
    """Seconds from the trainer's start until the evaluator's ledger first shows `target` (EMA, validation)."""
    data = ["--data-dir", data_dir] if data_dir else []
    began = time.time()
    evaluator = subprocess.Popen([sys.executable, "-m", "evaluator.cli", "--workdir", str(workdir),
                                  "--exit-when-done", "--progress", "plain", *data], stdout=subprocess.DEVNULL,
                                 cwd=REPO)
    trainer = subprocess.Popen([sys.executable, "-m", "trainer.cli", "--workdir", str(workdir), "--model", model,
                                "--steps", str(max_steps), "--save-every", str(save_every), "--keep", "3",
                                "--progress", "plain", "--log-every", str(10**9), *data], stdout=subprocess.DEVNULL,
                               cwd=REPO)
    reached = None
    ledger = workdir / "eval" / "results.jsonl"
    while trainer.poll() is None or evaluator.poll() is None:
        rows = [json.loads(x) for x in ledger.read_text().splitlines()] if ledger.exists() else []
        hits = [r["finished"] for r in rows if r["status"] == "ok" and r["accuracy"] >= target]
        if hits:
            reached = min(hits) - began
            break
        time.sleep(0.2)
    for proc in (trainer, evaluator):
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=120)
    return reached


def keras_time_to_accuracy(data_dir: str | None, *, target: float, max_epochs: int) -> float | None:
    """Seconds from a fresh process's start until `fit`'s per-epoch validation accuracy reaches `target`.

    Like our figure, it includes starting Python, importing TensorFlow and loading the data.
    """
    code = ("import sys, json; from bench.figures import _keras_tta; print(json.dumps("
            "_keras_tta(float(sys.argv[1]), sys.argv[2] or None, float(sys.argv[3]), int(sys.argv[4]))))")
    began = time.time()
    out = subprocess.run([sys.executable, "-c", code, str(began), data_dir or "", str(target), str(max_epochs)],
                         check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _keras_tta(began: float, data_dir: str | None, target: float, max_epochs: int) -> float | None:
    import keras

    data = datasets.load("fashion-mnist", data_dir)
    model = keras_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"], jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = data.train.images[..., None].astype(np.float32) / 255.0
    xv = data.validation.images[..., None].astype(np.float32) / 255.0
    reached: list[float] = []

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if (logs or {}).get("val_accuracy", 0.0) >= target:
                reached.append(time.time() - began)
                self.model.stop_training = True

    model.fit(x, data.train.labels, batch_size=BATCH, epochs=max_epochs, verbose=0,
              validation_data=(xv, data.validation.labels), callbacks=[Stop()])
    return reached[0] if reached else None


def run_in_thread(fn: Any) -> Any:
    """Run `fn` in a thread (keeps the main thread free for signals) and return its result."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    return box[0]
