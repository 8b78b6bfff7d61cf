"""`make bench`: figures B1-B7 side by side in one run; a Rich table, bench/results.json and bench/RESULTS.md.

    python -m bench.run [--quick] [--data-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# Sizes of each measurement: full (make bench) and quick (--quick, about a minute; used by a test).
PLANS = {
    "full": {"train_steps": 800, "repeats": 3, "b2_steps": 1000, "b3_steps": 2500, "b3_every": 100,
             "eval_repeats": 5, "b5_target": 0.91, "b5_steps": 15000, "b5_every": 500, "b5_epochs": 15,
             "b6_count": 100, "b7_repeats": 5},
    "quick": {"train_steps": 60, "repeats": 1, "b2_steps": 200, "b3_steps": 120, "b3_every": 20,
              "eval_repeats": 2, "b5_target": 0.3, "b5_steps": 200, "b5_every": 50, "b5_epochs": 3,
              "b6_count": 5, "b7_repeats": 1},
}


def summary(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples),
            "samples": samples}


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def measure(plan: dict[str, Any], data_dir: str | None, model: str) -> dict[str, Any]:
    from bench import figures as f
    from common import datasets

    data = datasets.load("fashion-mnist", data_dir)
    spec = f.spec_for(model, "fashion-mnist")
    out: dict[str, Any] = {}
    n, reps = plan["train_steps"], plan["repeats"]

    ours = [f.ours_images_per_sec(data, spec, n) for _ in range(reps)]
    k_default = [f.keras_fit_images_per_sec(data, n, jit_compile="auto") for _ in range(reps)]
    k_nojit = [f.keras_fit_images_per_sec(data, n, jit_compile=False) for _ in range(reps)]
    best_keras = max(statistics.median(k_default), statistics.median(k_nojit))
    out["B1"] = {"name": "training throughput (images/s)", "ours": summary(ours),
                 "keras_fit_default": summary(k_default), "keras_fit_no_jit": summary(k_nojit),
                 "ratio": statistics.median(ours) / best_keras, "target": "ratio >= 1.10",
                 "met": statistics.median(ours) / best_keras >= 1.10}
    out["B1_xla"] = {"name": "experiment: our step with jit_compile=True (images/s)",
                     "ours": summary([f.ours_images_per_sec(data, spec, n, jit=True) for _ in range(reps)])}
    out["B1_one_step_per_call"] = {"name": "experiment: one step per tf.function call (images/s)",
                                   "ours": summary([f.ours_images_per_sec(data, spec, n, steps_per_loop=1)
                                                    for _ in range(reps)])}

    full, bare = [], []
    for _ in range(reps):  # alternate, so that drift hits both alike
        full.append(f.ours_images_per_sec(data, spec, plan["b2_steps"], save_every=100))
        bare.append(f.ours_images_per_sec(data, spec, plan["b2_steps"], use_ema=False))
    cost = 1 - statistics.median(full) / statistics.median(bare)
    out["B2"] = {"name": "cost of EMA + a save every 100 steps", "ours_with": summary(full),
                 "ours_without": summary(bare), "cost_fraction": cost, "target": "<= 3% slower", "met": cost <= 0.03}

    with tempfile.TemporaryDirectory() as tmp:
        lat = f.detection_latency(Path(tmp) / "run", data_dir, model=model, steps=plan["b3_steps"],
                                  save_every=plan["b3_every"])
    p50, it50 = statistics.median(lat["ours_ms"]), statistics.median(lat["iterator_ms"] or [float("nan")])
    out["B3"] = {"name": "detection latency, commit -> restore start (ms)", "ours": summary(lat["ours_ms"]),
                 "ours_p95": percentile(lat["ours_ms"], 0.95), "iterator": summary(lat["iterator_ms"] or [0.0]),
                 "iterator_p95": percentile(lat["iterator_ms"] or [0.0], 0.95), "checkpoints": lat["checkpoints"],
                 "ours_evaluated": lat["ours_evaluated"], "iterator_yielded": lat["iterator_yielded"],
                 "ratio": it50 / p50, "target": "p50 <= 50 ms and >= 10x lower than the iterator",
                 "met": p50 <= 50 and it50 / p50 >= 10}

    mine, theirs = f.eval_images_per_sec(data, spec, plan["eval_repeats"])
    sizes = f.eval_batch_sizes(data, spec, (100, 1000, 5000), plan["eval_repeats"])
    out["B4_batch_sizes"] = {"name": "experiment: evaluation images/s at batch 100 / 1000 / 5000",
                             "ours": " / ".join(f"{v:,.0f}" for v in sizes.values()), "by_size": sizes}
    out["B4"] = {"name": "evaluation throughput, validation split (images/s)", "ours": summary(mine),
                 "keras_evaluate": summary(theirs), "ratio": statistics.median(mine) / statistics.median(theirs),
                 "target": "ratio >= 1.0", "met": statistics.median(mine) >= statistics.median(theirs)}

    with tempfile.TemporaryDirectory() as tmp:
        ours_tta = f.time_to_accuracy(Path(tmp) / "run", data_dir, model=model, target=plan["b5_target"],
                                      max_steps=plan["b5_steps"], save_every=plan["b5_every"])
    keras_tta = f.keras_time_to_accuracy(data_dir, target=plan["b5_target"], max_epochs=plan["b5_epochs"])
    out["B5"] = {"name": f"time to {100 * plan['b5_target']:.0f}% validation accuracy (s)", "ours": ours_tta,
                 "keras_fit": keras_tta, "target": "faster than fit",
                 "met": ours_tta is not None and (keras_tta is None or ours_tta < keras_tta)}

    with tempfile.TemporaryDirectory() as tmp:
        mem = f.evaluator_memory(Path(tmp) / "run", data_dir, model=model, count=plan["b6_count"])
        growth = mem["last_mb"] / mem["first_mb"] - 1
        out["B6"] = {"name": f"evaluator RSS over {mem['evaluated']} checkpoints (MB)", **mem,
                     "growth_fraction": growth, "target": "grows <= 10%", "met": growth <= 0.10}
        walls = f.once_wall_secs(Path(tmp) / "run", data_dir, plan["b7_repeats"])
    out["B7"] = {"name": "evaluator --once, cold process, nothing pending (s)", "ours": summary(walls),
                 "target": "reported"}
    return out


def machine() -> dict[str, Any]:
    import tensorflow as tf

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "tensorflow": tf.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(id, figure, ours, theirs, ratio, target/met) for display."""
    def med(x: Any, fmt: str = "{:,.0f}", missing: str = "—") -> str:
        if x is None:
            return missing
        if isinstance(x, str):
            return x
        if isinstance(x, dict):
            return fmt.format(x["median"]) + (f" ({fmt.format(x['min'])}–{fmt.format(x['max'])})" if x["n"] > 1 else "")
        return fmt.format(x)

    table = []
    for key, fig in results.items():
        ours = fig.get("ours", fig.get("ours_with"))
        theirs = fig.get("keras_fit_no_jit") or fig.get("keras_evaluate") or fig.get("iterator") or fig.get(
            "ours_without") or fig.get("keras_fit")
        fmt = "{:,.1f}" if key in ("B3", "B5", "B7") else "{:,.0f}"
        extra = ""
        if key == "B1":
            extra = f"Keras fit: default compile {med(fig['keras_fit_default'])}; jit_compile=False "
        if key == "B2":
            extra = f"cost {100 * fig['cost_fraction']:+.1f}%; without EMA and saves "
        if key == "B3":
            extra = f"p95 ours {fig['ours_p95']:.1f}, iterator {fig['iterator_p95']:.1f}; checkpoints_iterator p50 "
        if key == "B6":
            ours, theirs = fig["last_mb"], fig["first_mb"]
            extra = f"growth {100 * fig['growth_fraction']:+.1f}%; after the first "
        ratio = f"{fig['ratio']:.2f}" if "ratio" in fig else ""
        met = fig.get("met")
        verdict = "" if met is None else ("met" if met else "MISSED")
        missing = "not reached" if key == "B5" else "—"
        table.append((key, fig["name"], med(ours, fmt, missing), extra + med(theirs, fmt, missing), ratio,
                      f"{fig.get('target', '')} {verdict}".strip()))
    return table


def write_outputs(results: dict[str, Any], info: dict[str, Any], out_dir: Path, plan_name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"machine": info, "plan": plan_name, "figures": results},
                                                     indent=2) + "\n")
    lines = [f"# Benchmark results ({plan_name})", "",
             f"Machine: {info['cpu']}, {info['cores']} cores; TensorFlow {info['tensorflow']}, "
             f"Python {info['python']}; {info['date']}.", "",
             "Medians (min–max) of the runs; `python -m bench.run` (`make bench`).", "",
             "| # | figure | this project | compared with | ratio | target |", "|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows(results)]
    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    (out_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a one-minute version with small sizes")
    p.add_argument("--data-dir", help="folder with the four IDX files (default: the usual places)")
    p.add_argument("--model", default="cnn")
    p.add_argument("--out", type=Path, default=HERE, help="where results.json and RESULTS.md go (default bench/)")
    args = p.parse_args(argv)
    from common.tfenv import quiet_import_tensorflow

    quiet_import_tensorflow()
    plan_name = "quick" if args.quick else "full"
    results = measure(PLANS[plan_name], args.data_dir, args.model)
    info = machine()
    write_outputs(results, info, args.out, plan_name)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"benchmarks ({plan_name}) on {info['cpu']}, {info['cores']} cores, TF {info['tensorflow']}")
    for col in ("#", "figure", "this project", "compared with", "ratio", "target"):
        table.add_column(col)
    for row in rows(results):
        table.add_row(*row)
    Console(width=max(160, Console().width)).print(table)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
