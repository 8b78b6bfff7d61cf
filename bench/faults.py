"""B16: a bucket workdir through an unreliable network: training with frequent saves, an evaluator watching.

A trainer (mlp, a save every `save_every` steps, every checkpoint kept) and `evaluator --exit-when-done`
run side by side on an S3 workdir (moto on 127.0.0.1) whose every request passes through
`tests.cloud.FlakyProxy`, which resets connections, answers 503 and 429, delays and cuts answers in
`rate` of them (seeded). The same run without faults (the proxy passing everything) is measured
alternately with it, `repeats` times each.

    python -m bench.faults [--rate 0.05] [--steps 300] [--save-every 10] [--repeats 1]

What is checked, per run: both programs exit 0 (training never stops for a transient fault); every
checkpoint the state file lists has an `ok` row in the evaluators' ledger (no commit lost, every
commit evaluated); no row is `error`. Counted: the faults the proxy injected, by kind, and the
retries the two programs logged (one warning line each); the wall time of the pair, with and without faults.
The data are the tests' tiny generated set: the figure is about the protocol, not this machine's arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RETRY_MARKS = ("retrying in", "retrying after exception", "downloading it again")  # one per logged retry


def run_pair(workdir: str, data_dir: str, env: dict[str, str], *, steps: int, save_every: int) -> dict[str, Any]:
    """The trainer and a watching evaluator on `workdir`; their exit codes, logged retries and wall time."""
    common = ["--workdir", workdir, "--data-dir", data_dir]
    trainer = [sys.executable, "-m", "trainer.cli", *common, "--model", "mlp", "--steps", str(steps),
               "--save-every", str(save_every), "--steps-per-loop", "5", "--keep", "0", "--progress", "plain"]
    evaluator = [sys.executable, "-m", "evaluator.cli", *common, "--poll-secs", "0.5", "--exit-when-done",
                 "--nice", "0"]
    began = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for cmd in (trainer, evaluator)]
    errs = [p.communicate(timeout=1800)[1] for p in procs]
    wall = time.monotonic() - began
    retries = [sum(line.count(mark) for line in err.splitlines() for mark in RETRY_MARKS) for err in errs]
    return {"trainer_exit": procs[0].returncode, "evaluator_exit": procs[1].returncode, "wall_s": wall,
            "retries_logged": {"trainer": retries[0], "evaluator": retries[1]},
            "stderr_tail": {"trainer": errs[0].strip()[-400:], "evaluator": errs[1].strip()[-400:]}}


def check(workdir: str) -> dict[str, Any]:
    """Commits listed, those with an `ok` row, and rows of each status, read straight from the store."""
    from common.checkpoint import checkpoints
    from common.run.ledger import Ledger
    from common.storage import open_storage

    storage = open_storage(workdir)
    state = checkpoints.read_state(storage)
    listed = [Path(p).name for p in (state.paths if state else [])]
    rows = Ledger(storage).read()
    ok = {r["checkpoint"] for r in rows if r["status"] == "ok"}
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {"commits": len(listed), "evaluated": len(ok & set(listed)), "unevaluated": sorted(set(listed) - ok),
            "statuses": statuses}


def measure(*, rate: float = 0.05, steps: int = 300, save_every: int = 10, repeats: int = 1,
            seed: int = 16) -> dict[str, Any]:
    """Runs with and without faults, alternately; per run what `run_pair` and `check` give, and the proxy's counts."""
    from tests.cloud import FlakyProxy, cloud_servers
    from tests.helpers import write_dataset

    runs: dict[str, list[dict[str, Any]]] = {"faults": [], "clean": []}
    with tempfile.TemporaryDirectory() as tmp, cloud_servers() as cloud:
        data_dir = str(write_dataset(Path(tmp) / "data"))
        for repeat in range(repeats):
            for kind, at in (("faults", rate), ("clean", 0.0)):
                with FlakyProxy(cloud.s3, rate=at, seed=seed + repeat, delay_secs=0.2) as proxy:
                    workdir = f"s3://{cloud.new_bucket('s3')}/run"
                    env = os.environ | {"AWS_ENDPOINT_URL": proxy.url, "TF_CPP_MIN_LOG_LEVEL": "2"}
                    got = run_pair(workdir, data_dir, env, steps=steps, save_every=save_every)
                    got |= {"requests": proxy.seen, "injected": dict(proxy.injected)}
                got |= check(workdir)  # straight to the store, past the proxy
                runs[kind].append(got)
    return {"rate": rate, "steps": steps, "save_every": save_every, "runs": runs, "problems": problems(runs)}


def problems(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What missed the target in any run: an exit other than 0, a commit not evaluated, an `error` row."""
    found = []
    for kind, each in runs.items():
        for i, r in enumerate(each):
            where = f"{kind} run {i + 1}"
            if r["trainer_exit"] or r["evaluator_exit"]:
                found.append(f"{where}: trainer exit {r['trainer_exit']}, evaluator exit {r['evaluator_exit']}: "
                             f"{r['stderr_tail']}")
            if r["unevaluated"] or not r["commits"]:
                found.append(f"{where}: {len(r['unevaluated'])} of {r['commits']} commits not evaluated")
            if r["statuses"].get("error"):
                found.append(f"{where}: {r['statuses']['error']} rows recorded as error")
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    print(json.dumps(measure(rate=args.rate, steps=args.steps, save_every=args.save_every, repeats=args.repeats),
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
