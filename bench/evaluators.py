"""B14: how fast 1, 2 and 4 evaluators drain a backlog of checkpoints together (checkpoints per minute).

A workdir of `checkpoints` checkpoints of a model that is slow to evaluate (tests.byo_models:slow_eval:
each evaluation waits `pause` seconds more, as a large validation set or model on an accelerator would,
without taking this machine's two cores) is copied once per run; then N `evaluator --once` start together
on the copy. The rate is the checkpoints evaluated over the time from the first evaluation's start to the
last one's end, read from the ledger (each row's `started` and `finished`), so that TensorFlow's start-up
in each process does not count. The counts are measured alternately, `repeats` times each.

    python -m bench.evaluators [--checkpoints 24] [--pause 1.0] [--repeats 2]

The data are the tests' tiny generated set (a 50-image validation split: one batch, one pause per
evaluation), so the figure is about sharing the work, not about this machine's arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = "tests.byo_models:slow_eval"


def _train(workdir: Path, data_dir: str, checkpoints: int) -> None:
    subprocess.run([sys.executable, "-m", "trainer.cli", "--workdir", str(workdir), "--data-dir", data_dir,
                    "--model", MODEL, "--steps", str(5 * checkpoints), "--save-every", "5", "--steps-per-loop", "5",
                    "--keep", "0", "--progress", "plain"], check=True, cwd=REPO, capture_output=True, text=True)


def drain(source: Path, workdir: Path, data_dir: str, evaluators: int, pause: float) -> dict[str, Any]:
    """N `evaluator --once` on a copy of `source`; the rate (checkpoints/min) and who evaluated how many."""
    shutil.copytree(source, workdir, symlinks=True)
    cmd = [sys.executable, "-m", "evaluator.cli", "--workdir", str(workdir), "--data-dir", data_dir, "--once",
           "--json", "--nice", "0"]
    env = os.environ | {"SLOW_EVAL_SECS": str(pause)}
    procs = [subprocess.Popen([*cmd, "--name", f"e{i}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, env=env) for i in range(evaluators)]
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"evaluator exited {proc.returncode}: {err.strip()[-300:]}")
    rows = [json.loads(line) for line in (workdir / "eval" / "results.jsonl").read_text().splitlines()]
    ok = [r for r in rows if r["status"] == "ok"]
    span = max(r["finished"] for r in ok) - min(r["started"] for r in ok)
    per = Counter(r["evaluator"] for r in ok)
    duplicates = len(ok) - len({r["checkpoint"] for r in ok})
    return {"rate": 60 * len(ok) / span, "evaluated": len(ok), "duplicates": duplicates,
            "per_evaluator": dict(sorted(per.items()))}


def measure(*, counts: tuple[int, ...] = (1, 2, 4), checkpoints: int = 24, pause: float = 1.0,
            repeats: int = 2) -> dict[str, Any]:
    """The rates per evaluator count, measured alternately (1, 2, 4, 1, 2, 4, ...)."""
    from tests.helpers import write_dataset

    rates: dict[int, list[float]] = {n: [] for n in counts}
    shares: dict[int, list[dict[str, int]]] = {n: [] for n in counts}
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(write_dataset(Path(tmp) / "data"))
        source = Path(tmp) / "source"
        _train(source, data_dir, checkpoints)
        for repeat in range(repeats):
            for n in counts:
                got = drain(source, Path(tmp) / f"run-{n}-{repeat}", data_dir, n, pause)
                rates[n].append(got["rate"])
                shares[n].append(got["per_evaluator"])
                if got["evaluated"] != checkpoints or got["duplicates"]:
                    problems.append(f"{n} evaluators: {got['evaluated']} rows, {got['duplicates']} duplicates")
    return {"rates": {str(n): v for n, v in rates.items()}, "shares": {str(n): v for n, v in shares.items()},
            "checkpoints": checkpoints, "pause_secs": pause, "problems": problems}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=int, default=24)
    p.add_argument("--pause", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    print(json.dumps(measure(checkpoints=args.checkpoints, pause=args.pause, repeats=args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
