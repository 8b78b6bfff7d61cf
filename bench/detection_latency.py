"""Detection latency of the watching evaluator: state-file commit -> detection -> restore start.

Runs a real trainer and a real `evaluator --exit-when-done` on one workdir, then reads the
evaluator's ledger. `committed` is the trainer's timestamp taken just before it writes the state
file, so the figures include the state file's write and fsync.

    python bench/detection_latency.py [--steps 6000] [--save-every 250] [--model cnn]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--model", default="cnn")
    p.add_argument("--data-dir")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "run"
        data = ["--data-dir", args.data_dir] if args.data_dir else []
        evaluator = subprocess.Popen([sys.executable, "-m", "evaluator.cli", "--workdir", str(workdir),
                                      "--exit-when-done", "--progress", "plain", *data], stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "trainer.cli", "--workdir", str(workdir), "--model", args.model,
                        "--steps", str(args.steps), "--save-every", str(args.save_every), "--keep", "0",
                        "--progress", "plain", "--log-every", str(10**9), *data], check=True,
                       stdout=subprocess.DEVNULL)
        evaluator.wait(timeout=300)
        rows = [json.loads(line) for line in (workdir / "eval" / "results.jsonl").read_text().splitlines()]
    detect = sorted(1000 * (r["detected"] - r["committed"]) for r in rows)
    start = sorted(1000 * (r["started"] - r["committed"]) for r in rows)
    for name, xs in (("commit -> detected", detect), ("commit -> restore start", start)):
        p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
        print(f"{name}: n={len(xs)} p50={statistics.median(xs):.1f} ms p95={p95:.1f} ms max={xs[-1]:.1f} ms")
    print(f"statuses: {sorted({r['status'] for r in rows})}, eval_secs median "
          f"{statistics.median(r['eval_secs'] for r in rows):.2f}")


if __name__ == "__main__":
    main()
