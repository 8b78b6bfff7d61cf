"""B15: the training thread's blocking time per save, `--save-mode async` against `sync`.

The model is a user's `--model` of about 25M parameters (`bench.saves:wide_mlp`, a wide MLP; with
its EMA shadows and Adam's two slots a checkpoint holds about 100M floats, 400 MB). Each run is a
real `trainer` process on the tests' tiny generated data; the figures are read from its `saved`
log lines: `blocked_s` (the training thread's time in the save, the wait for the previous save
included) and `write_s` (the writer's time). The runs alternate sync and async, on a local folder
and on the S3 emulator (moto on 127.0.0.1, tests/cloud.py).

    python -m bench.saves [--steps 60] [--save-every 15] [--repeats 1]

Each save of a run is a sample; the first save of a run is left out (it traces TensorFlow's write
function in sync mode and builds the snapshot's object graph in async mode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = "bench.saves:wide_mlp"
WIDTH = 4600  # two hidden layers of this width on 28x28 images: 24.8M parameters


def wide_mlp(num_classes: int, input_shape: tuple[int, int, int]) -> Any:
    """A user's model of about 25M parameters: flatten, two dense layers of WIDTH, logits."""
    import keras

    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                             keras.layers.Dense(WIDTH, activation="relu", name="wide1"),
                             keras.layers.Dense(WIDTH, activation="relu", name="wide2"),
                             keras.layers.Dense(num_classes, name="logits")])


def parameters(num_classes: int = 10, pixels: int = 28 * 28) -> int:
    """The model's parameter count."""
    return pixels * WIDTH + WIDTH + WIDTH * WIDTH + WIDTH + WIDTH * num_classes + num_classes


def run(workdir: str, data_dir: str, mode: str, *, steps: int, save_every: int) -> dict[str, Any]:
    """One trainer run; its saves' times (the first left out) and its wall time."""
    cmd = [sys.executable, "-m", "trainer.cli", "--workdir", workdir, "--data-dir", data_dir, "--model", MODEL,
           "--steps", str(steps), "--save-every", str(save_every), "--save-mode", mode, "--keep", "2",
           "--batch-size", "32", "--steps-per-loop", "5", "--progress", "plain", "--log-every", "1000000"]
    began = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"trainer --save-mode {mode} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    saves = [_fields(line) for line in done.stdout.splitlines() if " trainer saved " in line]
    if len(saves) < 2:
        raise RuntimeError(f"trainer --save-mode {mode} logged {len(saves)} saves; expected {steps // save_every}")
    later = saves[1:]
    return {"blocked_s": [float(s["blocked_s"]) for s in later], "waited_s": [float(s["waited_s"]) for s in later],
            "write_s": [float(s["write_s"]) for s in later], "wall_s": wall}


def _fields(line: str) -> dict[str, str]:
    """The key=value fields of a log line."""
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def measure(*, steps: int = 60, save_every: int = 15, repeats: int = 1, bucket: bool = True) -> dict[str, Any]:
    """Both modes, alternately, on a local folder and (when the cloud extra is there) on the S3 emulator."""
    from tests.cloud import MISSING, SKIP_REASON, cloud_servers
    from tests.helpers import write_dataset

    got: dict[str, Any] = {"parameters": parameters(), "steps": steps, "save_every": save_every}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(write_dataset(Path(tmp) / "data"))
        got["local"] = _alternate(lambda mode, i: str(Path(tmp) / f"{mode}-{i}"), data_dir, steps, save_every,
                                  repeats)
        if not bucket or MISSING:
            left_out = "left out of this plan (a bucket run keeps 400 MB checkpoints in the emulator's memory)"
            got["s3_emulator"] = {"not_measured": SKIP_REASON if MISSING else left_out}
            return got
        with cloud_servers() as servers:
            got["s3_emulator"] = _alternate(lambda mode, i: f"s3://{servers.new_bucket('s3')}/run", data_dir, steps,
                                            save_every, repeats)
    return got


def _alternate(workdir: Any, data_dir: str, steps: int, save_every: int, repeats: int) -> dict[str, Any]:
    """sync, async, sync, async, ...: the samples of each mode, pooled over the repeats."""
    pooled: dict[str, dict[str, list[float]]] = {m: {"blocked_s": [], "waited_s": [], "write_s": [], "wall_s": []}
                                                 for m in ("sync", "async")}
    for i in range(repeats):
        for mode in ("sync", "async"):
            one = run(workdir(mode, i), data_dir, mode, steps=steps, save_every=save_every)
            for key in ("blocked_s", "waited_s", "write_s"):
                pooled[mode][key] += one[key]
            pooled[mode]["wall_s"].append(one["wall_s"])
    medians = {m: statistics.median(pooled[m]["blocked_s"]) for m in pooled}
    return {**pooled, "blocked_ratio": medians["async"] / medians["sync"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=15)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-bucket", action="store_true", help="measure the local folder only")
    args = p.parse_args()
    print(json.dumps(measure(steps=args.steps, save_every=args.save_every, repeats=args.repeats,
                             bucket=not args.no_bucket), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
