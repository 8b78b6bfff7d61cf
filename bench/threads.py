"""Thread pools: the trainer's wall time per `--threads` setting, alone and with an evaluator watching.

    python -m bench.threads [--steps 2000] [--save-every 500] [--repeats 2] [--data-dir DIR] [--out FILE]

Every setting runs once per round and the rounds repeat, so slow spells of the machine spread over
all settings; the table gives each setting's median wall time and its ratio to TensorFlow's own
choice (`auto`) measured in the same run. "Alone" runs the trainer by itself; "pair" runs it beside
`evaluator` (defaults, nice 10) with the evaluator's `--threads` as given, as `make eval-watch` would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import figures
from bench.run import cpu_info

# (trainer --threads, evaluator --threads); "auto" passes no flag.
ALONE = ("auto", "1,1", "2,1", "1,2", "2,2")
PAIRS = (("auto", "auto"), ("auto", "1,1"), ("2,1", "1,1"), ("auto", "1,2"))


def _flag(setting: str) -> list[str]:
    return [] if setting == "auto" else ["--threads", setting]


def measure(steps: int, save_every: int, repeats: int, data_dir: str | None) -> dict[str, Any]:
    """Median wall times (s) per setting, alone and in a pair, with the lag of the pair's evaluations."""
    base = ["--steps", str(steps), "--save-every", str(save_every)]
    alone: dict[str, list[float]] = {s: [] for s in ALONE}
    pair: dict[str, list[float]] = {f"{t} / {e}": [] for t, e in PAIRS}
    missing: dict[str, int] = {key: 0 for key in pair}
    data = ["--data-dir", data_dir] if data_dir else []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for setting in ALONE:
                alone[setting].append(figures.timed_trainer(root / f"alone-{setting}", [*base, *_flag(setting), *data]))
            for trainer, evaluator in PAIRS:
                key = f"{trainer} / {evaluator}"
                folder = root / f"pair-{trainer}-{evaluator}"
                folder.mkdir()
                run = figures.pair_wall_time(folder, [*base, *_flag(trainer)],
                                             _flag(evaluator), data_dir, alone=False)
                pair[key].append(run["pair_s"])
                missing[key] += len(run["missing"])
    pairs = _against_auto(pair, "auto / auto")
    for key, summary in pairs.items():
        summary["checkpoints_not_evaluated"] = missing[key]
    return {"alone": _against_auto(alone, "auto"), "pair": pairs}


def _against_auto(runs: dict[str, list[float]], auto: str) -> dict[str, dict[str, Any]]:
    """Each setting's median wall time, its runs, and its median over the `auto` setting's."""
    medians = {key: statistics.median(times) for key, times in runs.items()}
    return {key: {"median_s": medians[key], "runs_s": times, "ratio_to_auto": medians[key] / medians[auto]}
            for key, times in runs.items()}


def table(results: dict[str, Any]) -> str:
    lines = ["| run | trainer --threads | evaluator --threads | median wall (s) | runs (s) | / auto |",
             "|---|---|---|---|---|---|"]
    for setting, r in results["alone"].items():
        runs = ", ".join(f"{x:.1f}" for x in r["runs_s"])
        lines.append(f"| alone | {setting} | — | {r['median_s']:.1f} | {runs} | {r['ratio_to_auto']:.3f} |")
    for key, r in results["pair"].items():
        trainer, evaluator = key.split(" / ")
        runs = ", ".join(f"{x:.1f}" for x in r["runs_s"])
        missed = f" ({r['checkpoints_not_evaluated']} not evaluated)" if r["checkpoints_not_evaluated"] else ""
        lines.append(f"| pair | {trainer} | {evaluator} | {r['median_s']:.1f}{missed} | {runs} | "
                     f"{r['ratio_to_auto']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    results = measure(args.steps, args.save_every, args.repeats, args.data_dir)
    cpu = cpu_info()
    print(f"CPU: {cpu['cpu']} ({', '.join(cpu['vector_extensions'])}), {os.cpu_count()} cores; "
          f"--steps {args.steps} --save-every {args.save_every}, {args.repeats} rounds")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu, "args": vars(args) | {"out": str(args.out)}, **results},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
