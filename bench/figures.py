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

from common.checkpoint import checkpoints
from common.data import datasets
from common.model.evaluation import Evaluation
from common.run.spec import RunSpec
from common.run.workdir import Workdir
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
    iterator = iter(train_dataset(data.train, batch_size=BATCH, seed=0, start_step=0,
                                  prepare=spec.prepare))
    loop(iterator, tf.constant(steps_per_loop))  # trace and warm up
    with tempfile.TemporaryDirectory() as tmp:
        saver = CheckpointSaver(Workdir.open(tmp), state.checkpoint, state=checkpoints.State(), keep=5,
                                keep_every_hours=0, anchor=time.time())
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


def keras_model(num_classes: int, input_shape: tuple[int, int, int]) -> Any:
    """The tutorial CNN in Keras: the baseline of B1, B3 and B4."""
    import keras

    return keras.Sequential([
        keras.layers.Input(input_shape),
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

    model = keras_model(data.info.num_classes, data.info.input_spec.shape)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    skip = 20
    reps = -(-(steps + skip) * BATCH // len(data.train))  # enough data for one epoch of steps + skip
    x = np.tile(data.info.preprocessing.apply(data.train.images, data.info.input_spec).numpy(), (reps, 1, 1, 1))
    y = np.tile(data.train.labels, reps)
    timer = _Timer(skip)
    model.fit(x, y, batch_size=BATCH, epochs=1, steps_per_epoch=steps + skip, verbose=0,
              callbacks=[timer], shuffle=True)
    return (timer.batches - skip) * BATCH / (timer.ended - timer.began)


def eval_images_per_sec(data: datasets.Dataset, spec: RunSpec, repeats: int) -> tuple[list[float], list[float]]:
    """Validation-split throughput: this project's Evaluation against `keras.Model.evaluate`, same weights."""
    import keras

    state = TrainState(spec, tf.distribute.get_strategy())
    ours = Evaluation(state.model, spec.prepare)
    kmodel = keras_model(spec.num_classes, spec.input.shape)
    for layer, name in zip([kmodel.layers[i] for i in (0, 2, 5, 6)], ("conv1", "conv2", "fc1", "fc2"), strict=True):
        mine = state.model.layer(name)
        layer.set_weights([mine.kernel.numpy(), mine.bias.numpy()])
    kmodel.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                   jit_compile=False)
    x = spec.prepare(data.validation.images).numpy()
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
        run = Evaluation(state.model, spec.prepare, batch_size=size)
        run(data.validation)
        samples = []
        for _ in range(repeats):
            began = time.perf_counter()
            run(data.validation)
            samples.append(len(data.validation) / (time.perf_counter() - began))
        out[str(size)] = statistics.median(samples)
    return out


# tf.train.checkpoints_iterator as its users run it. It says when it is ready (TF imported), so that the
# trainer starts after it and its start-up is not counted; it ends once the bench has written the stop file
# and it has yielded the newest checkpoint, however long the run takes (a fixed timeout yielded nothing
# on a slow CPU, where the first checkpoint came later than the timeout). It polls once a second, as
# checkpoints_iterator does by default; a timeout under its 1 s sleep would make it poll in a busy loop.
ITERATOR_CONSUMER = """
import json, sys, time
from pathlib import Path
import tensorflow as tf
workdir, stop = sys.argv[1], Path(sys.argv[2])
last = [None]
def finished():
    return stop.exists() and tf.train.latest_checkpoint(workdir) == last[0]
print(json.dumps({"ready": time.time()}), flush=True)
for path in tf.train.checkpoints_iterator(workdir, min_interval_secs=1, timeout=5, timeout_fn=finished):
    last[0] = path
    print(json.dumps({"path": path, "seen": time.time()}), flush=True)
"""


def wait_for_output(path: Path, proc: subprocess.Popen[Any], what: str, budget: float = 600.0) -> None:
    """Wait until `proc` has written its first line to `path` (it is started and ready)."""
    deadline = time.monotonic() + budget
    while not (path.exists() and path.read_text().strip()):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready after {budget:.0f} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[Any], budget: float) -> None:
    """Wait up to `budget` seconds for `proc` to end, then end it."""
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def quiet_env() -> dict[str, str]:
    """This environment, with TensorFlow's C++ info and warning lines off, for the programs a figure starts."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def detection_latency(workdir: Path, data_dir: str | None, *, model: str, steps: int, save_every: int,
                      evaluator_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """State-file commit -> restore start for our evaluator, and commit -> yield for checkpoints_iterator."""
    data = ["--data-dir", data_dir] if data_dir else []
    env = quiet_env()
    logs = workdir.parent
    stop_file, iterator_log, evaluator_log = logs / "iterator.stop", logs / "iterator.jsonl", logs / "evaluator.log"
    with open(iterator_log, "w") as it_out, open(evaluator_log, "w") as ev_out:
        evaluator = subprocess.Popen([sys.executable, "-m", "evaluator.cli", "--workdir", str(workdir),
                                      "--exit-when-done", "--progress", "plain", *data, *evaluator_args],
                                     stdout=ev_out, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
        iterator = subprocess.Popen([sys.executable, "-c", ITERATOR_CONSUMER, str(workdir), str(stop_file)],
                                    stdout=it_out, stderr=subprocess.DEVNULL, env=env)
        train_secs = None
        try:
            wait_for_output(iterator_log, iterator, "the checkpoints_iterator consumer")
            wait_for_output(evaluator_log, evaluator, "the evaluator")
            began = time.monotonic()
            subprocess.run([sys.executable, "-m", "trainer.cli", "--workdir", str(workdir), "--model", model,
                            "--steps", str(steps), "--save-every", str(save_every), "--keep", "0", "--progress",
                            "plain", "--log-every", str(10**9), *data], check=True, stdout=subprocess.DEVNULL,
                           env=env, cwd=REPO)
            train_secs = time.monotonic() - began
            stop_file.touch()
        finally:
            # Both follow the run to its end; what they still owe after it is at most a few evaluations
            # (ours) or one poll interval (the iterator), so the grace scales with the run's own length.
            _stop(evaluator, 0 if train_secs is None else 60 + train_secs)
            _stop(iterator, 0 if train_secs is None else 60)
    state = Workdir.open(workdir).state()
    assert state is not None
    stamps = state.timestamps_by_path()
    committed = {Path(p).name: stamps.get(p, 0.0) for p in state.paths}
    rows = [json.loads(line) for line in (workdir / "eval" / "results.jsonl").read_text().splitlines()]
    ours = [1000 * (r["started"] - r["committed"]) for r in rows if r["status"] == "ok"]
    seen = [json.loads(line) for line in iterator_log.read_text().splitlines()]
    theirs = [1000 * (s["seen"] - committed[Path(s["path"]).name]) for s in seen if "path" in s]
    return {"ours_ms": ours, "iterator_ms": theirs, "checkpoints": len(committed),
            "iterator_yielded": len(theirs), "ours_evaluated": len(ours)}


MEMORY_PROBE = """
import json, sys, resource
from pathlib import Path
from common.tfenv import quiet_import_tensorflow
quiet_import_tensorflow()
from evaluator.config import EvalConfig
from evaluator.session import Session
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
    model = keras_model(data.info.num_classes, data.info.input_spec.shape)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"], jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = data.info.preprocessing.apply(data.train.images, data.info.input_spec).numpy()
    xv = data.info.preprocessing.apply(data.validation.images, data.info.input_spec).numpy()
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


# B1 and B9 in a fresh process: TF reads TF_ENABLE_ONEDNN_OPTS once, at import, so each oneDNN setting
# needs its own process. tensorflow is imported first and directly, so that the variable is read exactly
# as this process's environment has it (the project's import would set it to 1 where it is unset).
THROUGHPUT_PROCESS = """
import json, sys
import tensorflow
from bench.figures import throughput_process
print(json.dumps(throughput_process(json.loads(sys.argv[1]))))
"""


def throughput_process(params: dict[str, Any]) -> dict[str, Any]:
    """In this process: ours and Keras fit (images/s) alternately, then the B9 matmul peak if asked."""
    from bench import flops
    from common.run import loader
    from common.tfenv import Runtime, configure

    setup = configure(Runtime(device=params["device"]))
    out: dict[str, Any] = {"onednn": setup.onednn, "device": setup.device, "gpus": list(setup.gpus)}
    if params.get("only_if_onednn_off") and setup.onednn:
        return out  # the same configuration as the oneDNN-on process: nothing new to measure
    data = datasets.load("fashion-mnist", params["data_dir"])
    spec = spec_for(params["model"], "fashion-mnist")
    steps = params["steps"]
    samples: dict[str, list[float]] = {"ours": [], "keras_fit_default": [], "keras_fit_no_jit": []}
    for _ in range(params["repeats"]):  # alternate, so that drift hits all three alike
        samples["ours"].append(ours_images_per_sec(data, spec, steps))
        samples["keras_fit_default"].append(keras_fit_images_per_sec(data, steps, jit_compile="auto"))
        samples["keras_fit_no_jit"].append(keras_fit_images_per_sec(data, steps, jit_compile=False))
    out |= samples
    if params.get("matmul_size"):
        out["matmul_gflops"] = flops.matmul_gflops(params["matmul_size"], params["matmul_repeats"])
        out["flops"] = flops.training_flops(loader.build_model(spec))
    return out


def run_throughput_process(onednn: str | None, params: dict[str, Any]) -> dict[str, Any]:
    """Run `throughput_process` with TF_ENABLE_ONEDNN_OPTS set to `onednn` (None: unset, TF's default)."""
    from common.tfenv import ONEDNN_VAR

    env = {k: v for k, v in quiet_env().items() if k != ONEDNN_VAR}
    if onednn is not None:
        env[ONEDNN_VAR] = onednn
    out = subprocess.run([sys.executable, "-c", THROUGHPUT_PROCESS, json.dumps(params)], capture_output=True,
                         text=True, cwd=REPO, env=env)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the measuring process exited {out.returncode}: {last}"}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def timed_trainer(workdir: Path, args: list[str], env: dict[str, str] | None = None) -> float:
    """Wall time of one trainer process, from launch to exit, as `make train` would see it."""
    env = env if env is not None else quiet_env()
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "trainer.cli", "--workdir", str(workdir), *args], check=True,
                   stdout=subprocess.DEVNULL, env=env, cwd=REPO)
    return time.monotonic() - began


def pair_wall_time(root: Path, args: list[str], evaluator_args: list[str], data_dir: str | None, *,
                   alone: bool = True) -> dict[str, Any]:
    """B8: the trainer alone, then the trainer with an evaluator watching beside it (`make eval-watch`).

    `args` are the trainer's flags beyond the workdir (none: `make train`'s defaults). The evaluator
    starts first and is ready before the trainer starts, as when `make eval-watch` is already running.
    `alone=False` skips the first run (`alone_s` is then None).
    """
    data = ["--data-dir", data_dir] if data_dir else []
    env = quiet_env()
    alone_s = timed_trainer(root / "alone", [*args, *data], env) if alone else None
    workdir, log_path = root / "pair", root / "evaluator.log"
    with open(log_path, "w") as log:
        evaluator = subprocess.Popen([sys.executable, "-m", "evaluator.cli", "--workdir", str(workdir),
                                      "--exit-when-done", "--progress", "plain", *data, *evaluator_args],
                                     stdout=log, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
        paired = None
        try:
            wait_for_output(log_path, evaluator, "the evaluator")
            paired = timed_trainer(workdir, [*args, *data], env)
        finally:
            # Once training is over the evaluator owes at most the evaluations still queued; each took a
            # fraction of the run, so the run's own length bounds them.
            _stop(evaluator, 0 if paired is None else 60 + paired)
    return {"alone_s": alone_s, "pair_s": paired, "evaluator_exit": evaluator.returncode,
            **evaluated_checkpoints(workdir, args)}


def evaluated_checkpoints(workdir: Path, args: list[str]) -> dict[str, Any]:
    """Which of the run's checkpoints the evaluator evaluated, and the lag from commit to result (s)."""
    from trainer.cli import build_config, parser

    cfg = build_config(parser().parse_args([*args, "--workdir", str(workdir)]))  # the model's own steps
    final = json.loads((workdir / "done.json").read_text())["step"]
    expected = {f"model-{s}" for s in range(cfg.save_every, cfg.steps + 1, cfg.save_every)} | {f"model-{final}"}
    ledger = workdir / "eval" / "results.jsonl"
    rows = [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []
    ok = {r["checkpoint"]: r["finished"] - r["committed"] for r in rows if r["status"] == "ok"}
    return {"checkpoints": len(expected), "evaluated": len(expected & set(ok)),
            "missing": sorted(expected - set(ok)), "lag_s": [ok[name] for name in sorted(expected & set(ok))]}
