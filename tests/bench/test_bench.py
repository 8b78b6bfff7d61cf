"""The benchmark's plumbing: every figure is a finite number or says why it was not measured.

No timing is asserted: what a figure measured depends on the machine; that it was measured, or
explicitly not, does not.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import figures, run


def _strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in results.json")

    return json.loads(text, parse_constant=refuse)


def _finite_or_not_measured(x: Any, where: str) -> None:
    if isinstance(x, dict) and "not_measured" in x:
        assert isinstance(x["not_measured"], str) and x["not_measured"].strip(), f"{where}: no reason"
        return
    number = x["median"] if isinstance(x, dict) else x
    assert isinstance(number, (int, float)) and math.isfinite(number), f"{where}: {x!r}"


def _finite(x: Any, where: str) -> None:
    number = x["median"] if isinstance(x, dict) else x
    assert isinstance(number, (int, float)) and math.isfinite(number), f"{where}: {x!r}"


def test_missing_samples_and_zero_divisors_are_not_measured_with_a_reason() -> None:
    assert run.summary([], missing="the iterator yielded nothing") == {"not_measured": "the iterator yielded nothing"}
    assert run.ratio(run.summary([], missing="x"), 5.0) == {"not_measured": "one side was not measured"}
    assert "not_measured" in run.ratio(3.0, 0.0)
    assert run.ratio({"median": 6.0, "min": 6.0, "max": 6.0, "n": 1, "samples": [6.0]}, 2.0) == 3.0
    assert run.problems({"B3": {"ours": float("nan"), "iterator": {"not_measured": ""}}}) == [
        "figures.B3.ours: nan", "figures.B3.iterator: not measured without a reason"]


def test_results_files_say_not_measured_and_never_nan(tmp_path: Path) -> None:
    results = {"B3": {"name": "detection latency, commit -> restore start (ms)",
                      "ours": {"median": 20.0, "min": 10.0, "max": 30.0, "n": 3, "samples": [10.0, 20.0, 30.0]},
                      "ours_p95": 30.0, "iterator": run.summary([], missing="it yielded none of 6 checkpoints"),
                      "iterator_p95": run.percentile([], 0.95), "checkpoints": 6, "ours_evaluated": 6,
                      "iterator_yielded": 0, "ratio": run.ratio(run.summary([], missing="x"), 20.0),
                      "target": "p50 <= 50 ms", "met": None, "onednn": True}}
    info = {**run.cpu_info(), "cores": 2, "tensorflow": "2", "python": "3", "date": "today", "gpus": [],
            "device": "cpu", "onednn_bench_process": True}
    run.write_outputs(results, info, tmp_path, "quick")
    _strict_json((tmp_path / "results.json").read_text())
    text = (tmp_path / "RESULTS.md").read_text()
    assert "not measured: it yielded none of 6 checkpoints" in text
    assert "p50 <= 50 ms not measured" in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    with pytest.raises(ValueError):
        run.write_outputs({"B3": {**results["B3"], "ratio": float("nan")}}, info, tmp_path, "quick")


@pytest.mark.slow
def test_iterator_consumer_follows_the_run_to_its_last_checkpoint(tmp_path: Path) -> None:
    """It waits for the first checkpoint however late it comes, and stops only after the newest one."""
    import tensorflow as tf

    workdir, stop, log_path = tmp_path / "run", tmp_path / "stop", tmp_path / "seen.jsonl"
    workdir.mkdir()
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), workdir, max_to_keep=None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", figures.ITERATOR_CONSUMER, str(workdir), str(stop)],
                                stdout=log, stderr=subprocess.DEVNULL)
        figures.wait_for_output(log_path, proc, "the consumer", budget=300)
        first = manager.save()
        deadline = time.monotonic() + 300
        while first not in log_path.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        last = manager.save()
        stop.touch()
        assert proc.wait(timeout=300) == 0
    seen = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [s["path"] for s in seen if "path" in s] == [first, last]


@pytest.mark.soak  # about 3 minutes of CPU (some twenty TensorFlow processes): `make soak`, not `make test`
def test_quick_bench_produces_every_figure(tiny_data: Path, tmp_path: Path) -> None:
    assert run.main(["--quick", "--data-dir", str(tiny_data), "--out", str(tmp_path)]) == 0
    results = _strict_json((tmp_path / "results.json").read_text())
    figures_ = results["figures"]
    assert set(figures_) >= {"B1_as_shipped", "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10"}
    assert run.problems(figures_) == []
    for key, fig in figures_.items():
        for field in ("ours", "ratio", "keras_fit_default", "keras_fit_no_jit", "iterator", "keras_evaluate",
                      "keras_fit", "matmul_peak", "lag_s"):
            if field in fig:
                _finite_or_not_measured(fig[field], f"{key}.{field}")
        assert "onednn" in fig, key
    # What the quick plan can always measure, on any machine, is measured.
    always = {"B1": ("ours", "keras_fit_default", "keras_fit_no_jit", "ratio"), "B2": ("cost_fraction",),
              "B3": ("ours",), "B4": ("ours", "keras_evaluate", "ratio"), "B6": ("first_mb", "last_mb"),
              "B7": ("ours",), "B8": ("alone_s", "pair_s", "ratio", "lag_s"), "B9": ("ours", "matmul_peak", "ratio"),
              "B10": ("ours", "one_process", "ratio", "save_ms_two", "save_ms_one"),
              "B14": ("ours", "one", "two", "ratio"), "B15": ("ours", "sync", "ratio", "async_snapshot_s"),
              "B17": ("ours", "one", "three", "test_alone", "ratio")}
    for key, fields in always.items():
        for field in fields:
            _finite(figures_[key][field], f"{key}.{field}")
    assert figures_["B3"]["ours_evaluated"] == figures_["B3"]["checkpoints"]
    assert figures_["B14"]["problems"] == []  # every checkpoint evaluated once, by 1, 2 and 4 evaluators
    assert figures_["B17"]["problems"] == []  # one pin per checkpoint, whatever the number of sets
    assert figures_["B6"]["evaluated"] == run.PLANS["quick"]["b6_count"]
    assert figures_["B8"]["missing"] == [] and figures_["B8"]["evaluated"] == figures_["B8"]["checkpoints"] == 3
    assert figures_["B9"]["flops"]["per_image"] == 20_178_432  # the tutorial CNN, counted in bench/flops.py
    machine = results["machine"]
    assert {"cpu", "vector_extensions", "cores", "tensorflow", "date", "onednn_bench_process"} <= set(machine)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| B1 |" in text and "| B8 |" in text and "| B9 |" in text and "vector extensions" in text


def test_thread_settings_are_timed_in_rounds_against_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import threads

    order: list[str] = []

    def setting(args: list[str]) -> str:
        return args[args.index("--threads") + 1] if "--threads" in args else "auto"

    def trainer(workdir: Path, args: list[str], env: Any = None) -> float:
        order.append(f"alone {setting(args)}")
        return {"auto": 10.0, "1,1": 15.0}.get(setting(args), 12.0) + len(order) / 1000

    def pair(root: Path, args: list[str], evaluator_args: list[str], data_dir: Any, *, alone: bool) -> dict[str, Any]:
        assert not alone and root.is_dir()
        key = f"{setting(args)} / {setting(evaluator_args)}"
        order.append(f"pair {key}")
        return {"pair_s": 20.0 if key == "auto / auto" else 18.0, "missing": ["model-500"] if "1,2" in key else []}

    monkeypatch.setattr(figures, "timed_trainer", trainer)
    monkeypatch.setattr(figures, "pair_wall_time", pair)
    results = threads.measure(steps=40, save_every=20, repeats=2, data_dir=None)
    one_round = [f"alone {s}" for s in threads.ALONE] + [f"pair {t} / {e}" for t, e in threads.PAIRS]
    assert order == one_round * 2  # every setting once per round, so slow spells spread over all of them
    assert results["alone"]["auto"]["ratio_to_auto"] == 1.0
    assert results["alone"]["1,1"]["ratio_to_auto"] == pytest.approx(1.5, abs=0.01)
    assert results["pair"]["auto / 1,1"]["ratio_to_auto"] == pytest.approx(0.9)
    assert results["pair"]["auto / 1,2"]["checkpoints_not_evaluated"] == 2
    text = threads.table(results)
    assert "| pair | auto | 1,2 | 18.0 (2 not evaluated) |" in text and "| alone | 1,1 | — | 15.0 |" in text
