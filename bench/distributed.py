"""B10: a 2-worker job on this machine (`trainer --workers 2`) against one process, at the same global batch.

Two figures: training speed from the trainer's own progress lines, and the time of one save, which
in a multi-worker job is the chief's commit while the other worker writes its part to a scratch
folder. Run as a module, this file is the save probe that each process of the job runs:

    python -m bench.distributed --saves 30 --workdir DIR [--strategy multi-worker]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 64  # the trainer's default, split among the workers' replicas
_SPEED = re.compile(r"^(?:\[worker 0\] )?\S+ trainer progress step=(\d+) .*steps_per_sec=([\d.]+)")


def training_steps_per_sec(workdir: Path, args: list[str], workers: int) -> list[float]:
    """The chief's steps/s over each `--log-every` window after the first (which includes tracing)."""
    launch = ["--workers", str(workers)] if workers > 1 else []
    out = subprocess.run([sys.executable, "-m", "trainer.cli", *launch, "--workdir", str(workdir), *args,
                          "--progress", "plain"], check=True, capture_output=True, text=True, cwd=REPO).stdout
    speeds = [float(m[2]) for m in map(_SPEED.match, out.splitlines()) if m]
    return speeds[1:]


def save_seconds(workdir: Path, workers: int, saves: int) -> list[float]:
    """The chief's wall time of each save of the CNN's train state, with `workers` processes taking part."""
    from common.cluster import tf_config
    from trainer.launcher import free_ports

    command = [sys.executable, "-m", "bench.distributed", "--saves", str(saves), "--workdir", str(workdir)]
    if workers == 1:
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)]
    else:
        addresses = [f"127.0.0.1:{p}" for p in free_ports(workers)]
        configs = [tf_config({"worker": addresses}, "worker", i) for i in range(workers)]
        procs = [subprocess.Popen([*command, "--strategy", "multi-worker"], stdout=subprocess.PIPE, text=True,
                                  cwd=REPO, env=os.environ | {"TF_CONFIG": config}) for config in configs]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a save probe failed (exit codes {[p.returncode for p in procs]})")
    seconds: list[float] = json.loads(outs[0])["seconds"]
    return seconds


def _probe(saves: int, workdir: Path, strategy_name: str) -> dict[str, Any]:
    """Time `saves` saves of a fresh CNN train state, as the trainer makes them (chief or scratch saver)."""
    from common.checkpoint.checkpoints import State
    from common.tfenv import Runtime, configure, quiet_import_tensorflow

    quiet_import_tensorflow()
    configure(Runtime())
    from bench.figures import spec_for
    from common.distribute import make_strategy, topology
    from common.run.workdir import Workdir
    from trainer.distribute import ScratchSaver
    from trainer.saver import CheckpointSaver
    from trainer.step import TrainState

    strategy = make_strategy(strategy_name)
    chief = topology(strategy).chief
    state = TrainState(spec_for("cnn", "fashion-mnist"), strategy)
    if chief:
        workdir.mkdir(parents=True, exist_ok=True)
    empty = State(latest=None, paths=[], timestamps=[])
    saver = (CheckpointSaver(Workdir.open(workdir), state.checkpoint, state=empty, keep=3, keep_every_hours=0, anchor=0)
             if chief else ScratchSaver(workdir, state.checkpoint))
    seconds = []
    for step in range(1, saves + 1):
        began = time.perf_counter()
        saver.save(step)
        seconds.append(time.perf_counter() - began)
    return {"seconds": seconds[1:]}  # the first save traces the write function


def figure(root: Path, *, steps: int, saves: int, extra: list[str]) -> dict[str, Any]:
    """B10's samples: steps/s and save seconds, one process and two workers (`extra`: more trainer flags)."""
    args = ["--model", "cnn", "--batch-size", str(GLOBAL_BATCH), "--steps", str(steps),
            "--save-every", str(10 * steps), "--log-every", str(max(steps // 6, 10)), *extra]
    one = training_steps_per_sec(root / "one", args, 1)
    two = training_steps_per_sec(root / "two", args, 2)
    return {"one_steps_per_sec": one, "two_steps_per_sec": two,
            "one_save_s": save_seconds(root / "save-one", 1, saves),
            "two_save_s": save_seconds(root / "save-two", 2, saves)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--saves", type=int, default=30)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--strategy", default="default", choices=["default", "multi-worker"])
    args = p.parse_args()
    print(json.dumps(_probe(args.saves, args.workdir, args.strategy)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
