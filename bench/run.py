"""`make bench`: figures B1-B17 side by side in one run; a Rich table, bench/results.json and bench/RESULTS.md.

    python -m bench.run [--quick | --plan gpu] [--only B1,B8] [--device {auto,cpu,gpu}] [--data-dir DIR] [--out DIR]

A figure that could not be measured is written as {"not_measured": "<reason>"}, never as NaN or 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# B9 comes with B1, from the same process; B11-B13 (bucket workdirs) are measured together.
ALL_FIGURES = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B10", "B11", "B14", "B15", "B16", "B17")
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")

# Sizes of each measurement. full: `make bench` (about 15 minutes on 2 cores). quick: about two minutes,
# used by a test. gpu: bench/gpu_check.sh on a one-GPU machine (under 5 minutes). b8_args are the
# trainer's flags in B8; none is `make train` itself.
PLANS: dict[str, dict[str, Any]] = {
    "full": {"train_steps": 800, "repeats": 3, "experiment_repeats": 1, "b2_steps": 1000, "b3_steps": 2500,
             "b3_every": 100, "eval_repeats": 5, "b5_target": 0.91, "b5_steps": 15000, "b5_every": 500,
             "b5_epochs": 15, "b6_count": 100, "b7_repeats": 5, "b8_args": [], "matmul_size": 2048,
             "matmul_repeats": 5, "b10_steps": 600, "b10_saves": 30, "cloud_samples": 10, "cloud_poll_secs": 2.0,
             "b14_checkpoints": 24, "b14_pause": 1.0, "b14_repeats": 2, "b15_steps": 100, "b15_every": 25,
             "b15_repeats": 2, "b15_bucket": True, "b16_steps": 300, "b16_save_every": 10, "b16_repeats": 1,
             "b17_steps": 600, "b17_repeats": 3, "b17_folder_images": 2000},
    "quick": {"train_steps": 60, "repeats": 1, "experiment_repeats": 0, "b2_steps": 150, "b3_steps": 80,
              "b3_every": 20, "eval_repeats": 2, "b5_target": 0.3, "b5_steps": 150, "b5_every": 50, "b5_epochs": 3,
              "b6_count": 3, "b7_repeats": 1, "b8_args": ["--steps", "60", "--save-every", "20"],
              "matmul_size": 1024, "matmul_repeats": 5, "b10_steps": 60, "b10_saves": 3, "cloud_samples": 3,
              "cloud_poll_secs": 0.5, "b14_checkpoints": 4, "b14_pause": 0.2, "b14_repeats": 1, "b15_steps": 20,
              "b15_every": 10, "b15_repeats": 1, "b15_bucket": False, "b16_steps": 40, "b16_save_every": 10,
              "b16_repeats": 1, "b17_steps": 60, "b17_repeats": 1, "b17_folder_images": 100},
    # On a GPU, oneDNN (a CPU library) does not change B1, so its second process is left out.
    "gpu": {"figures": ("B1", "B4", "B8"), "train_steps": 1000, "repeats": 2, "experiment_repeats": 0,
            "b1_as_shipped": False, "eval_repeats": 5, "b8_args": [], "matmul_size": 8192, "matmul_repeats": 5},
}


def not_measured(reason: str) -> dict[str, str]:
    """A figure that could not be measured, with the reason (in place of a number)."""
    return {"not_measured": reason}


def measured(x: Any) -> bool:
    return x is not None and not (isinstance(x, dict) and "not_measured" in x)


def summary(samples: list[float], *, missing: str) -> dict[str, Any]:
    """Median, spread and samples; not measured (with `missing` as the reason) when there are none."""
    if not samples:
        return not_measured(missing)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples),
            "samples": samples}


def value(x: Any) -> float | None:
    """The number a figure stands for (a summary's median), or None when it was not measured."""
    if not measured(x):
        return None
    return float(x["median"]) if isinstance(x, dict) else float(x)


def ratio(top: Any, bottom: Any) -> Any:
    a, b = value(top), value(bottom)
    if a is None or b is None:
        return not_measured("one side was not measured")
    if b <= 0:
        return not_measured("the compared figure is 0")
    return a / b


def percentile(xs: list[float], q: float) -> Any:
    if not xs:
        return not_measured("no samples")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


@dataclasses.dataclass
class Context:
    """What every figure needs: the plan, the data and how this process runs TensorFlow."""

    plan: dict[str, Any]
    data_dir: str | None
    model: str
    device: str
    onednn: bool | None  # this (the bench's) process
    trainer_args: list[str]
    evaluator_args: list[str]
    info: dict[str, Any]
    _data: Any = None

    @property
    def data(self) -> Any:
        from common.data import datasets

        if self._data is None:
            self._data = datasets.load("fashion-mnist", self.data_dir)
        return self._data


def b1(ctx: Context) -> dict[str, Any]:
    """B1 twice (as shipped; both with oneDNN on), the oneDNN-off experiment where it differs, and B9."""
    from bench import figures as f

    plan = ctx.plan
    params = {"device": ctx.device, "data_dir": ctx.data_dir, "model": ctx.model, "steps": plan["train_steps"],
              "repeats": plan["repeats"], "matmul_size": plan["matmul_size"], "matmul_repeats": plan["matmul_repeats"]}
    on = f.run_throughput_process("1", params)
    out: dict[str, Any] = {}
    fair = _b1_figure("training throughput, both with oneDNN on (images/s)", on, on, ctx.plan)
    fair |= {"target": "ratio >= 1.10", "met": _at_least(fair["ratio"], 1.10)}
    tf_default: dict[str, Any] = {}
    if plan.get("b1_as_shipped", True):
        tf_default = f.run_throughput_process(None, params | {"only_if_onednn_off": True, "matmul_size": 0})
        ctx.info["onednn_tf_default"] = tf_default.get("onednn")
        same = "error" not in tf_default and "ours" not in tf_default  # TF turns oneDNN on here by itself
        shipped = _b1_figure("training throughput as shipped: ours (oneDNN on) against Keras fit with TF's "
                             "default (images/s)", on, on if same else tf_default, ctx.plan)
        if same:
            shipped["note"] = "TF turns oneDNN on by itself on this CPU: the same measurement as B1"
        out["B1_as_shipped"] = shipped | {"target": "reported"}
    out["B1"] = fair
    if "ours" in tf_default:
        out["B1_onednn_off"] = {"name": "experiment: ours with TF's default here, oneDNN off (images/s)",
                                "ours": summary(tf_default["ours"], missing="no run"), "onednn": False}
    out["B9"] = _b9(on)
    if plan["experiment_repeats"]:
        out |= _b1_experiments(ctx)
    return out


def _b1_figure(name: str, ours_from: dict[str, Any], keras_from: dict[str, Any],
               plan: dict[str, Any]) -> dict[str, Any]:
    why = ours_from.get("error") or keras_from.get("error") or "no run"
    fig: dict[str, Any] = {
        "name": name, "ours": summary(ours_from.get("ours", []), missing=why),
        "keras_fit_default": summary(keras_from.get("keras_fit_default", []), missing=why),
        "keras_fit_no_jit": summary(keras_from.get("keras_fit_no_jit", []), missing=why),
        "onednn": {"ours": ours_from.get("onednn"), "Keras fit": keras_from.get("onednn")},
        "device": ours_from.get("device", "not measured"), "steps": plan["train_steps"]}
    keras = [x for x in (fig["keras_fit_default"], fig["keras_fit_no_jit"]) if measured(x)]
    fig["ratio"] = ratio(fig["ours"], max(keras, key=lambda x: x["median"])) if keras else not_measured(why)
    return fig


def _b9(on: dict[str, Any]) -> dict[str, Any]:
    name = "training FLOP/s as a fraction of a measured float32 matmul peak (GFLOP/s)"
    if "error" in on or "matmul_gflops" not in on:
        reason = on.get("error", "no matmul measured")
        return {"name": name, "ours": not_measured(reason), "matmul_peak": not_measured(reason),
                "ratio": not_measured(reason), "target": "reported", "onednn": on.get("onednn")}
    from bench.flops import fraction_of_peak

    images = statistics.median(on["ours"])
    frac = fraction_of_peak(on["flops"]["per_image"], images, on["matmul_gflops"])
    return {"name": name, "ours": frac["achieved_gflops"], "matmul_peak": frac["peak_gflops"],
            "matmul_runs": summary(on["matmul_gflops"], missing="no run"), "ratio": frac["fraction"],
            "images_per_sec": images, "flops": on["flops"], "target": "reported", "onednn": on.get("onednn"),
            "device": on.get("device")}


def _b1_experiments(ctx: Context) -> dict[str, Any]:
    from bench import figures as f

    spec = f.spec_for(ctx.model, "fashion-mnist")
    n, reps = ctx.plan["train_steps"], ctx.plan["experiment_repeats"]
    return {
        "B1_xla": {"name": "experiment: our step with jit_compile=True (images/s)", "onednn": ctx.onednn,
                   "ours": summary([f.ours_images_per_sec(ctx.data, spec, n, jit=True) for _ in range(reps)],
                                   missing="no run")},
        "B1_one_step_per_call": {
            "name": "experiment: one step per tf.function call (images/s)", "onednn": ctx.onednn,
            "ours": summary([f.ours_images_per_sec(ctx.data, spec, n, steps_per_loop=1) for _ in range(reps)],
                            missing="no run")},
    }


def _at_least(x: Any, bound: float) -> bool | None:
    v = value(x)
    return None if v is None else v >= bound


def b2(ctx: Context) -> dict[str, Any]:
    from bench import figures as f

    spec = f.spec_for(ctx.model, "fashion-mnist")
    full, bare = [], []
    for _ in range(ctx.plan["repeats"]):  # alternate, so that drift hits both alike
        full.append(f.ours_images_per_sec(ctx.data, spec, ctx.plan["b2_steps"], save_every=100))
        bare.append(f.ours_images_per_sec(ctx.data, spec, ctx.plan["b2_steps"], use_ema=False))
    cost = 1 - statistics.median(full) / statistics.median(bare)
    return {"B2": {"name": "cost of EMA + a save every 100 steps", "ours_with": summary(full, missing="no run"),
                   "ours_without": summary(bare, missing="no run"), "cost_fraction": cost,
                   "target": "<= 3% slower", "met": cost <= 0.03, "onednn": ctx.onednn}}


def b3(ctx: Context) -> dict[str, Any]:
    from bench import figures as f

    # At a checkpoint every 100 steps a lower-priority evaluator cannot keep up with a trainer that fills both
    # cores, and the figure would time its queue, not its detection; B8 times the defaults at the default cadence.
    evaluator_args = ("--nice", "0", *ctx.evaluator_args)
    with tempfile.TemporaryDirectory() as tmp:
        lat = f.detection_latency(Path(tmp) / "run", ctx.data_dir, model=ctx.model, steps=ctx.plan["b3_steps"],
                                  save_every=ctx.plan["b3_every"], evaluator_args=evaluator_args)
    ours = summary(lat["ours_ms"], missing=f"our evaluator evaluated none of {lat['checkpoints']} checkpoints")
    theirs = summary(lat["iterator_ms"],
                     missing=f"checkpoints_iterator yielded none of {lat['checkpoints']} checkpoints")
    p50, it50 = value(ours), value(theirs)
    fig = {"name": f"detection latency, commit -> restore start (ms); evaluator {' '.join(evaluator_args)}, "
                   f"a checkpoint every {ctx.plan['b3_every']} steps", "ours": ours, "evaluator_args": evaluator_args,
           "ours_p95": percentile(lat["ours_ms"], 0.95), "iterator": theirs,
           "iterator_p95": percentile(lat["iterator_ms"], 0.95), "checkpoints": lat["checkpoints"],
           "ours_evaluated": lat["ours_evaluated"], "iterator_yielded": lat["iterator_yielded"],
           "ratio": ratio(theirs, ours), "target": "p50 <= 50 ms and >= 10x lower than the iterator",
           "met": None if p50 is None or it50 is None else p50 <= 50 and it50 / p50 >= 10, "onednn": ctx.onednn}
    return {"B3": fig}


def b4(ctx: Context) -> dict[str, Any]:
    from bench import figures as f

    spec = f.spec_for(ctx.model, "fashion-mnist")
    mine, theirs = f.eval_images_per_sec(ctx.data, spec, ctx.plan["eval_repeats"])
    sizes = f.eval_batch_sizes(ctx.data, spec, (100, 1000, 5000), ctx.plan["eval_repeats"])
    ours, keras = summary(mine, missing="no run"), summary(theirs, missing="no run")
    return {
        "B4_batch_sizes": {"name": "experiment: evaluation images/s at batch 100 / 1000 / 5000",
                           "by_size": sizes, "onednn": ctx.onednn},
        "B4": {"name": "evaluation throughput, validation split (images/s)", "ours": ours, "keras_evaluate": keras,
               "ratio": ratio(ours, keras), "target": "ratio >= 1.0", "met": _at_least(ratio(ours, keras), 1.0),
               "onednn": ctx.onednn, "device": ctx.info.get("device")}}


def b5(ctx: Context) -> dict[str, Any]:
    from bench import figures as f

    plan = ctx.plan
    with tempfile.TemporaryDirectory() as tmp:
        ours_tta = f.time_to_accuracy(Path(tmp) / "run", ctx.data_dir, model=ctx.model, target=plan["b5_target"],
                                      max_steps=plan["b5_steps"], save_every=plan["b5_every"])
    keras_tta = f.keras_time_to_accuracy(ctx.data_dir, target=plan["b5_target"], max_epochs=plan["b5_epochs"])
    ours = ours_tta if ours_tta is not None else not_measured(f"not reached in {plan['b5_steps']} steps")
    keras = keras_tta if keras_tta is not None else not_measured(f"not reached in {plan['b5_epochs']} epochs")
    met = None if ours_tta is None else keras_tta is None or ours_tta < keras_tta
    return {"B5": {"name": f"time to {100 * plan['b5_target']:.0f}% validation accuracy (s)", "ours": ours,
                   "keras_fit": keras, "target": "faster than fit", "met": met, "onednn": ctx.onednn}}


def b6_b7(ctx: Context) -> dict[str, Any]:
    from bench import figures as f

    with tempfile.TemporaryDirectory() as tmp:
        mem = f.evaluator_memory(Path(tmp) / "run", ctx.data_dir, model=ctx.model, count=ctx.plan["b6_count"])
        growth = mem["last_mb"] / mem["first_mb"] - 1
        walls = f.once_wall_secs(Path(tmp) / "run", ctx.data_dir, ctx.plan["b7_repeats"])
    return {
        "B6": {"name": f"evaluator RSS over {mem['evaluated']} checkpoints (MB)", **mem, "growth_fraction": growth,
               "target": "grows <= 10%", "met": growth <= 0.10, "onednn": ctx.onednn},
        "B7": {"name": "evaluator --once, cold process, nothing pending (s)",
               "ours": summary(walls, missing="no run"), "target": "reported", "onednn": ctx.onednn}}


def b8(ctx: Context) -> dict[str, Any]:
    from bench import figures as f

    args = [*ctx.plan["b8_args"], *ctx.trainer_args]
    evaluator_args = list(ctx.evaluator_args)
    if ctx.device == "gpu" and "--device" not in evaluator_args:
        evaluator_args += ["--device", "gpu"]  # both programs on the one GPU
    with tempfile.TemporaryDirectory() as tmp:
        pair = f.pair_wall_time(Path(tmp), args, evaluator_args, ctx.data_dir)
    slowdown = ratio(pair["pair_s"], pair["alone_s"])
    factor = value(slowdown)
    lag = summary(pair["lag_s"], missing="no checkpoint was evaluated")
    flags = " ".join(args) or "the defaults of `make train`"
    return {"B8": {"name": f"trainer wall time with an evaluator watching / alone (s); trainer flags: {flags}",
                   "pair_s": pair["pair_s"], "alone_s": pair["alone_s"], "ratio": slowdown,
                   "checkpoints": pair["checkpoints"], "evaluated": pair["evaluated"], "missing": pair["missing"],
                   "lag_s": lag, "lag_max_s": max(pair["lag_s"]) if pair["lag_s"] else not_measured("no lag"),
                   "evaluator_args": evaluator_args, "evaluator_exit": pair["evaluator_exit"],
                   "target": "ratio <= 1.10, every checkpoint evaluated",
                   "met": None if factor is None else factor <= 1.10 and not pair["missing"],
                   "onednn": ctx.onednn}}


def b10(ctx: Context) -> dict[str, Any]:
    from bench import distributed

    data = ["--data-dir", ctx.data_dir] if ctx.data_dir else []
    with tempfile.TemporaryDirectory() as tmp:
        got = distributed.figure(Path(tmp), steps=ctx.plan["b10_steps"], saves=ctx.plan["b10_saves"], extra=data)
    batch = distributed.GLOBAL_BATCH
    two = summary([s * batch for s in got["two_steps_per_sec"]], missing="no progress line after the first")
    one = summary([s * batch for s in got["one_steps_per_sec"]], missing="no progress line after the first")
    return {"B10": {"name": "training images/s of 2 local workers (trainer --workers 2), cnn, global batch 64",
                    "ours": two, "one_process": one, "ratio": ratio(two, one),
                    "save_ms_two": summary([1000 * s for s in got["two_save_s"]], missing="no save"),
                    "save_ms_one": summary([1000 * s for s in got["one_save_s"]], missing="no save"),
                    "note": "two workers share this machine's cores", "target": "reported",
                    "onednn": ctx.onednn}}


def b11_b13(ctx: Context) -> dict[str, Any]:
    """A bucket workdir on the S3 emulator: detection latency, requests per idle poll, save cost (docs/storage.md)."""
    names = {"B11": "bucket workdir (S3 emulator): detection latency, commit -> restore start (ms)",
             "B12": "bucket workdir: HTTP requests per idle poll, 100 checkpoints (compared with: 5)",
             "B13": "bucket workdir: commit of one checkpoint with a 4 MiB shard (ms), S3 emulator vs local"}
    from bench import objectstore
    from tests.cloud import MISSING, SKIP_REASON

    if MISSING:
        return {k: {"name": n, "ours": not_measured(SKIP_REASON), "onednn": ctx.onednn} for k, n in names.items()}
    poll = ctx.plan["cloud_poll_secs"]
    r = objectstore.measure(samples=ctx.plan["cloud_samples"], poll_secs=poll, shard_mib=4.0)
    latency = summary([1000 * s for s in r["detection_latency_s"]["samples"]], missing="no commit noticed")
    p50 = value(latency)
    requests, save = r["requests_per_idle_poll"], r["save_s"]
    bucket, local = (summary([1000 * s for s in save[k]], missing="no save") for k in ("s3_emulator", "local"))
    return {
        "B11": {"name": f"{names['B11']}, --poll-secs {poll:g}", "ours": latency,
                "target": f"p50 <= {1000 * poll + 100:.0f} ms",
                "met": None if p50 is None else p50 <= 1000 * poll + 100, "onednn": ctx.onednn},
        "B12": {"name": names["B12"], "ours": requests["100"], "theirs": requests["5"], "target": "constant",
                "met": requests["100"] == requests["5"], "onednn": ctx.onednn},
        "B13": {"name": names["B13"], "ours": bucket, "local": local, "ratio": ratio(bucket, local),
                "target": "reported", "onednn": ctx.onednn}}


def b14(ctx: Context) -> dict[str, Any]:
    """Backlog drain by 1, 2 and 4 evaluators sharing a workdir (bench/evaluators.py)."""
    from bench import evaluators

    got = evaluators.measure(checkpoints=ctx.plan["b14_checkpoints"], pause=ctx.plan["b14_pause"],
                             repeats=ctx.plan["b14_repeats"])
    rates = {n: summary(v, missing="no rows") for n, v in got["rates"].items()}
    return {"B14": {"name": f"backlog drain, checkpoints/min: 1 / 2 / 4 evaluators sharing a workdir "
                            f"({got['checkpoints']} checkpoints, {got['pause_secs']:g} s per evaluation)",
                    "ours": rates["4"], "one": rates["1"], "two": rates["2"], "ratio": ratio(rates["4"], rates["1"]),
                    "ratio_two": ratio(rates["2"], rates["1"]), "shares": got["shares"],
                    "target": "each checkpoint once; rate grows with evaluators",
                    "met": not got["problems"] and (value(rates["4"]) or 0) > (value(rates["2"]) or 0)
                    > (value(rates["1"]) or 0), "problems": got["problems"], "onednn": ctx.onednn}}


def b15(ctx: Context) -> dict[str, Any]:
    """Training-thread blocking per save, async against sync, a 25M-parameter user model (bench/saves.py)."""
    from bench import saves

    got = saves.measure(steps=ctx.plan["b15_steps"], save_every=ctx.plan["b15_every"],
                        repeats=ctx.plan["b15_repeats"], bucket=ctx.plan["b15_bucket"])
    size = (f"{got['parameters'] / 1e6:.1f}M-parameter MLP (bench.saves:wide_mlp), a save every "
            f"{got['save_every']} steps")
    return {key: _b15_row(got[place], f"training-thread blocking per save (s), async / sync, {where}, {size}",
                          ctx.onednn)
            for key, place, where in (("B15", "local", "local folder"), ("B15_s3", "s3_emulator", "S3 emulator"))}


def _b15_row(got: dict[str, Any], name: str, onednn: Any) -> dict[str, Any]:
    if not measured(got):
        return {"name": name, "ours": got, "onednn": onednn}
    mode = {m: {k: summary(got[m][k], missing="no save after the first") for k in got[m]} for m in ("sync", "async")}
    snapshot = summary([b - w for b, w in zip(got["async"]["blocked_s"], got["async"]["waited_s"], strict=True)],
                       missing="no save after the first")
    share = ratio(mode["async"]["blocked_s"], mode["sync"]["blocked_s"])
    fraction = value(share)
    return {"name": name, "ours": mode["async"]["blocked_s"], "sync": mode["sync"]["blocked_s"], "ratio": share,
            "async_waited_s": mode["async"]["waited_s"], "async_snapshot_s": snapshot,
            "async_write_s": mode["async"]["write_s"], "sync_write_s": mode["sync"]["write_s"],
            "wall_s": {m: mode[m]["wall_s"] for m in mode}, "target": "ratio <= 0.10",
            "met": None if fraction is None else fraction <= 0.10, "onednn": onednn}


def b17(ctx: Context) -> dict[str, Any]:
    """What each extra evaluation set costs per checkpoint, against one set (bench/sets.py)."""
    from bench import sets

    got = sets.measure(steps=ctx.plan["b17_steps"], repeats=ctx.plan["b17_repeats"],
                       folder_images=ctx.plan["b17_folder_images"], data_dir=ctx.data_dir)
    secs = {name: summary(v, missing="no checkpoint after the first") for name, v in got["secs"].items()}
    extra = {name: _minus(secs[name], secs["one"]) for name in ("two", "three")}
    return {"B17": {"name": f"seconds per checkpoint with 1 / 2 / 3 evaluation sets (validation; + test; + a folder "
                            f"of {got['folder_images']} PNGs), one pin each", "ours": secs["two"], "one": secs["one"],
                    "three": secs["three"], "test_alone": secs["test_alone"], "extra_test": extra["two"],
                    "extra_folder": _minus(secs["three"], secs["two"]), "ratio": ratio(secs["two"], secs["one"]),
                    "ratio_three": ratio(secs["three"], secs["one"]), "problems": got["problems"],
                    "target": "reported; one pin per checkpoint", "met": not got["problems"], "onednn": ctx.onednn}}


def _minus(a: Any, b: Any) -> Any:
    """The difference of two medians, or not measured."""
    x, y = value(a), value(b)
    return not_measured("one side was not measured") if x is None or y is None else x - y


def b16(ctx: Context) -> dict[str, Any]:
    """Training and a watching evaluator on a bucket workdir through a proxy injecting 5% faults (bench/faults.py)."""
    name = "bucket workdir through 5% injected faults: training + watching evaluator, wall s (compared with: no faults)"
    from tests.cloud import MISSING, SKIP_REASON

    if MISSING:
        return {"B16": {"name": name, "ours": not_measured(SKIP_REASON), "onednn": ctx.onednn}}
    from bench import faults

    got = faults.measure(rate=0.05, steps=ctx.plan["b16_steps"], save_every=ctx.plan["b16_save_every"],
                         repeats=ctx.plan["b16_repeats"])
    runs = got["runs"]
    walls = {k: summary([r["wall_s"] for r in v], missing="no run") for k, v in runs.items()}
    injected = [sum(r["injected"].values()) for r in runs["faults"]]
    logged = [sum(r["retries_logged"].values()) for r in runs["faults"]]
    return {"B16": {"name": f"{name}; {got['steps']} steps, a save every {got['save_every']}",
                    "ours": walls["faults"], "clean": walls["clean"], "ratio": ratio(walls["faults"], walls["clean"]),
                    "commits": [r["commits"] for r in runs["faults"]],
                    "evaluated": [r["evaluated"] for r in runs["faults"]],
                    "requests": [r["requests"] for r in runs["faults"]],
                    "injected": [r["injected"] for r in runs["faults"]], "injected_total": injected,
                    "retries_logged": logged, "statuses": [r["statuses"] for r in runs["faults"]],
                    "target": "every commit evaluated, none lost or error, exits 0",
                    "met": not got["problems"], "problems": got["problems"], "onednn": ctx.onednn}}


FIGURES: dict[str, Callable[[Context], dict[str, Any]]] = {
    "B1": b1, "B2": b2, "B3": b3, "B4": b4, "B5": b5, "B6": b6_b7, "B7": b6_b7, "B8": b8, "B10": b10,
    "B11": b11_b13, "B12": b11_b13, "B13": b11_b13, "B14": b14, "B15": b15, "B16": b16, "B17": b17}


def problems(results: dict[str, Any]) -> list[str]:
    """Every number that is not finite, and every not-measured figure without a reason (should be none)."""
    found: list[str] = []

    def walk(x: Any, where: str) -> None:
        if isinstance(x, dict):
            if "not_measured" in x and not (isinstance(x["not_measured"], str) and x["not_measured"].strip()):
                found.append(f"{where}: not measured without a reason")
            for k, v in x.items():
                walk(v, f"{where}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")
        elif isinstance(x, float) and not math.isfinite(x):
            found.append(f"{where}: {x}")

    walk(results, "figures")
    return found


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and which of the vector extensions that matter to TF it has."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            fields.setdefault(key.strip(), rest.strip())  # the first processor's; all cores are alike here
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:  # a VM may show only "AMD EPYC"; these tell Zen 3 from 4
        model += f" (family {fields['cpu family']} model {fields['model']})"
    flags = set(fields.get("flags", "").split())
    return {"cpu": model, "vector_extensions": [f for f in VECTOR_FLAGS if f in flags]}


def machine(setup: Any) -> dict[str, Any]:
    import tensorflow as tf

    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append(details.get("device_name", gpu.name))
    return {**cpu_info(), "cores": os.cpu_count(), "tensorflow": tf.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "gpus": gpus, "device": setup.device,
            "onednn_bench_process": setup.onednn}


def _text(x: Any, fmt: str) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, dict) and "not_measured" in x:
        return f"not measured: {x['not_measured']}"
    if isinstance(x, dict):
        spread = f" ({fmt.format(x['min'])}–{fmt.format(x['max'])})" if x["n"] > 1 else ""
        return fmt.format(x["median"]) + spread
    return fmt.format(x)


def _onednn_text(x: Any) -> str:
    word = {True: "on", False: "off", None: "unknown"}
    if isinstance(x, dict):
        return "; ".join(f"{who} {word[v]}" for who, v in x.items())
    return word.get(x, "—")


Cells = tuple[Any, Any, str]  # (this project, compared with, text before "compared with")


def _ours(fig: dict[str, Any]) -> Any:
    return fig.get("ours", fig.get("ours_with"))


def _b1_cells(fig: dict[str, Any], fmt: str) -> Cells:
    return (_ours(fig), fig["keras_fit_no_jit"],
            f"Keras fit: default compile {_text(fig['keras_fit_default'], fmt)}; jit_compile=False ")


def _b3_cells(fig: dict[str, Any], fmt: str) -> Cells:
    return _ours(fig), fig["iterator"], (
        f"p95 ours {_text(fig['ours_p95'], fmt)}, iterator {_text(fig['iterator_p95'], fmt)}; "
        f"checkpoints_iterator ({fig['iterator_yielded']} of {fig['checkpoints']} yielded) p50 ")


def _b8_cells(fig: dict[str, Any], fmt: str) -> Cells:
    return fig["pair_s"], fig["alone_s"], (
        f"{fig['evaluated']} of {fig['checkpoints']} checkpoints evaluated, lag commit -> result "
        f"p50 {_text(value(fig['lag_s']), fmt)} s, max {_text(fig['lag_max_s'], fmt)} s; trainer alone ")


def _b9_cells(fig: dict[str, Any], fmt: str) -> Cells:
    runs: Any = fig.get("matmul_runs")
    if not measured(runs):
        return _ours(fig), fig["matmul_peak"], ""
    return _ours(fig), fig["matmul_peak"], f"float32 matmul, {_text(runs, fmt)} over {runs['n']} runs, fastest "


def _b10_cells(fig: dict[str, Any], fmt: str) -> Cells:
    return _ours(fig), fig["one_process"], (
        f"one save {_text(value(fig['save_ms_two']), '{:,.1f}')} ms against "
        f"{_text(value(fig['save_ms_one']), '{:,.1f}')} ms; one process ")


def _b15_cells(fig: dict[str, Any]) -> Cells:
    if "sync" not in fig:
        return _ours(fig), None, ""
    fmt = "{:,.3f}"
    return _ours(fig), fig["sync"], (
        f"async: snapshot {_text(fig['async_snapshot_s'], fmt)}, wait for the previous save "
        f"{_text(fig['async_waited_s'], fmt)}, writer {_text(fig['async_write_s'], '{:,.2f}')}; run wall "
        f"{_text(fig['wall_s']['async'], '{:,.0f}')} s against {_text(fig['wall_s']['sync'], '{:,.0f}')} s; sync ")


# How each figure fills the "this project" and "compared with" cells. B1 and its variants compare with
# Keras fit when they measured it; any other figure shows its own value and nothing to compare with.
_CELLS: dict[str, Callable[[dict[str, Any], str], Cells]] = {
    "B2": lambda fig, fmt: (_ours(fig), fig["ours_without"],
                            f"cost {100 * fig['cost_fraction']:+.1f}%; without EMA and saves "),
    "B3": _b3_cells,
    "B4": lambda fig, fmt: (_ours(fig), fig["keras_evaluate"], ""),
    "B4_batch_sizes": lambda fig, fmt: (" / ".join(fmt.format(v) for v in fig["by_size"].values()), None, ""),
    "B5": lambda fig, fmt: (_ours(fig), fig["keras_fit"], ""),
    "B6": lambda fig, fmt: (fig["last_mb"], fig["first_mb"],
                            f"growth {100 * fig['growth_fraction']:+.1f}%; after the first "),
    "B8": _b8_cells,
    "B9": _b9_cells,
    "B10": _b10_cells,
    "B12": lambda fig, fmt: (_ours(fig), fig["theirs"], ""),
    "B13": lambda fig, fmt: (_ours(fig), fig["local"], "local folder "),
    "B15": lambda fig, fmt: _b15_cells(fig),
    "B15_s3": lambda fig, fmt: _b15_cells(fig),
    "B14": lambda fig, fmt: (f"4: {_text(_ours(fig), fmt)}", fig["one"],
                             f"2: {_text(fig['two'], fmt)} ({_text(fig['ratio_two'], '{:.2f}')}x); 1: "),
    "B16": lambda fig, fmt: (f"{_text(_ours(fig), fmt)} ({_b16_counts(fig)})", fig.get("clean"), "no faults "),
    "B17": lambda fig, fmt: (f"2: {_text(_ours(fig), fmt)}", fig["one"],
                             f"3: {_text(fig['three'], fmt)}; test alone {_text(fig['test_alone'], fmt)}; 1: "),
}
_ONE_DECIMAL = ("B3", "B5", "B7", "B8", "B9", "B11", "B12", "B13", "B14", "B16")
_TWO_DECIMALS = ("B17",)
_THREE_DECIMALS = ("B15", "B15_s3")  # seconds of a save


def _b16_counts(fig: dict[str, Any]) -> str:
    """B16's counts: commits evaluated, faults injected of requests, retries logged."""
    if "commits" not in fig:
        return "not measured"
    return (f"{sum(fig['evaluated'])} of {sum(fig['commits'])} commits evaluated; {sum(fig['injected_total'])} "
            f"faults in {sum(fig['requests'])} requests, {sum(fig['retries_logged'])} retries logged")


def rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """(id, figure, oneDNN, ours, compared with, ratio, target/met) for display."""
    table: list[tuple[str, ...]] = []
    for key, fig in results.items():
        fmt = ("{:,.3f}" if key in _THREE_DECIMALS else "{:,.2f}" if key in _TWO_DECIMALS
               else "{:,.1f}" if key in _ONE_DECIMAL else "{:,.0f}")
        cells = _CELLS.get(key) or (_b1_cells if "keras_fit_default" in fig else None)
        ours, theirs, extra = cells(fig, fmt) if cells else (_ours(fig), None, "")
        note = f" ({fig['note']})" if fig.get("note") else ""
        met = fig.get("met")
        target = fig.get("target", "")
        if target and target != "reported":
            target += " " + ("not measured" if met is None else "met" if met else "MISSED")
        ratio_text = "" if "ratio" not in fig else _text(fig["ratio"], "{:.2f}")
        table.append((key, fig["name"] + note, _onednn_text(fig.get("onednn")), _text(ours, fmt),
                      (extra + _text(theirs, fmt)) if (theirs is not None or extra) else "—", ratio_text, target))
    return table


def header(info: dict[str, Any]) -> list[str]:
    tf_default = {True: "on", False: "off", None: "not measured in this run"}[info.get("onednn_tf_default")]
    gpus = ", ".join(info["gpus"]) or "none"
    return [f"Machine: {info['cpu']} (vector extensions: {', '.join(info['vector_extensions']) or 'none found'}), "
            f"{info['cores']} cores; GPU: {gpus}; TensorFlow {info['tensorflow']}, Python {info['python']}; "
            f"{info['date']}.", "",
            f"oneDNN: TensorFlow's own default on this CPU is {tf_default}; the project turns it on "
            f"(`TF_ENABLE_ONEDNN_OPTS=1`) unless the user set the variable. The oneDNN column says what each "
            "measuring process had."]


def write_outputs(results: dict[str, Any], info: dict[str, Any], out_dir: Path, plan_name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "plan": plan_name, "figures": results}
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    lines = [f"# Benchmark results ({plan_name})", "", *header(info), "",
             "Medians (min–max) of the runs; `python -m bench.run` (`make bench`). "
             "A figure that could not be measured says so, with the reason.", "",
             "| # | figure | oneDNN | this project | compared with | ratio | target |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows(results)]
    if "flops" in results.get("B9", {}):
        lines += ["", f"B9 counts training FLOPs per image from the model's layers: {results['B9']['flops']['formula']}"
                  " (backward ≈ 2x forward; biases, ReLU, pooling, the loss and the optimizer left out; "
                  "see bench/flops.py). Achieved = that count x images/s of B1's oneDNN-on run; the peak is the "
                  "fastest of several warm float32 `tf.linalg.matmul` runs in the same process (other load only "
                  "slows a run down)."]
    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    (out_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")


def measure(ctx: Context, wanted: list[str], write: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run the wanted figures in order, writing the outputs after each, so that an interrupted run keeps them."""
    results: dict[str, Any] = {}
    seconds = ctx.info.setdefault("seconds", {})  # what each part of the run cost, to keep `make bench` short
    done: set[Callable[[Context], dict[str, Any]]] = set()
    for key in wanted:
        fn = FIGURES[key]
        if fn in done:
            continue
        done.add(fn)
        began = time.monotonic()
        try:
            results |= fn(ctx)
        except Exception as e:  # one broken figure must not cost the others; it is reported, with why
            print(f"bench: {key} failed: {type(e).__name__}: {e}", file=sys.stderr)
            results[key] = {"name": key, "ours": not_measured(f"the measurement failed: {type(e).__name__}: {e}")}
        seconds[key] = round(time.monotonic() - began, 1)
        write(results)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick plan: small sizes, about two minutes")
    p.add_argument("--plan", choices=sorted(PLANS), help="full (default), quick or gpu (bench/gpu_check.sh)")
    p.add_argument("--only", help="comma-separated figures to run, e.g. B1,B8 (default: the plan's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="where this process and the B1 processes run (default auto)")
    p.add_argument("--trainer-args", default="", help="B8: extra trainer flags, e.g. '--threads 2,1'")
    p.add_argument("--evaluator-args", default="", help="B3 and B8: extra evaluator flags, e.g. '--nice 0 --threads 1'")
    p.add_argument("--data-dir", help="folder with the four IDX files (default: the usual places)")
    p.add_argument("--model", default="cnn")
    p.add_argument("--out", type=Path, default=HERE, help="where results.json and RESULTS.md go (default bench/)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan_name = args.plan or ("quick" if args.quick else "full")
    plan = PLANS[plan_name]
    wanted = [k.strip() for k in args.only.split(",")] if args.only else list(plan.get("figures", ALL_FIGURES))
    unknown = [k for k in wanted if k not in FIGURES]
    if unknown:
        print(f"bench: error: unknown figure(s) {', '.join(unknown)} (choose from {', '.join(FIGURES)})",
              file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # the programs B3-B8 start have no --device of their own
    from common.errors import ProjectError
    from common.tfenv import Runtime, configure, quiet_import_tensorflow

    quiet_import_tensorflow()
    try:
        setup = configure(Runtime(device=args.device))
    except ProjectError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return e.exit_code
    info = machine(setup)
    ctx = Context(plan=plan, data_dir=args.data_dir, model=args.model, device=args.device, onednn=setup.onednn,
                  trainer_args=shlex.split(args.trainer_args), evaluator_args=shlex.split(args.evaluator_args),
                  info=info)
    results = measure(ctx, wanted, lambda r: write_outputs(r, info, args.out, plan_name))
    for problem in problems(results):
        print(f"bench: warning: {problem}", file=sys.stderr)
    show(results, info, plan_name)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'RESULTS.md'}")
    return 0


def show(results: dict[str, Any], info: dict[str, Any], plan_name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"benchmarks ({plan_name}) on {info['cpu']} "
                        f"({', '.join(info['vector_extensions']) or 'no AVX2/AVX-512'}), {info['cores']} cores, "
                        f"TF {info['tensorflow']}")
    for col in ("#", "figure", "oneDNN", "this project", "compared with", "ratio", "target"):
        table.add_column(col)
    for row in rows(results):
        table.add_row(*row)
    Console(width=max(160, Console().width)).print(table)


if __name__ == "__main__":
    sys.exit(main())
