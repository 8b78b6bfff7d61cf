"""B17: what each extra evaluation set costs per checkpoint, against one set, measured side by side.

A finished run is evaluated, on fresh copies, by `evaluator --once` with one set (validation), the
test split alone, two sets (validation and test) and three (and a folder of PNGs cut from the test
images), in rounds that alternate the four. Each checkpoint's cost is its rows' span, from the
evaluation's start (before the pin) to its last set's end: one pin and one restore per weights
kind, whatever the number of sets. The first checkpoint of each run is left out (it traces the
evaluation function). Pins are counted: one per checkpoint in every configuration.

    python -m bench.sets [--steps 600] [--repeats 3] [--folder-images 2000] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {
    "one": ("--split", "validation"),
    "test_alone": ("--split", "test"),
    "two": ("--split", "validation", "--split", "test"),
    "three": ("--split", "validation", "--split", "test", "--eval-data", "folder=folder:{folder}"),
}


def _train(workdir: Path, data_dir: str | None, steps: int) -> None:
    data = ["--data-dir", data_dir] if data_dir else []
    subprocess.run([sys.executable, "-m", "trainer.cli", "--workdir", str(workdir), *data, "--model", "cnn3x3",
                    "--steps", str(steps), "--save-every", str(max(1, steps // 6)), "--keep", "0", "--progress",
                    "plain"], check=True, cwd=REPO, capture_output=True, text=True)


def _folder(root: Path, data_dir: str | None, images: int) -> Path:
    """A folder set: the first `images` test images as PNGs in class subfolders named like the run's classes.

    A class whose name holds a `/` (fashion-mnist's T-shirt/top) gets its folder with `_` in its place.
    """
    from PIL import Image

    from common.data import datasets

    data = datasets.load("fashion-mnist", data_dir)
    names = data.info.class_names
    for i in range(min(images, len(data.test))):
        folder = root / names[int(data.test.labels[i])].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.test.images[i]).save(folder / f"{i}.png")
    return root


def evaluate(source: Path, workdir: Path, flags: tuple[str, ...], data_dir: str | None) -> dict[str, Any]:
    """One `evaluator --once` on a copy of `source`; seconds per checkpoint (the first left out) and pins."""
    from common.run.workdir import Workdir
    from evaluator.cli import main as evaluator

    shutil.copytree(source, workdir, symlinks=True)
    pins: list[str] = []
    real = Workdir.pin
    def counted(self: Workdir, name: str) -> Any:
        pins.append(name)
        return real(self, name)

    Workdir.pin = counted  # type: ignore[method-assign]
    try:
        data = ["--data-dir", data_dir] if data_dir else []
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the rows are read from the ledger
            code = evaluator(["--workdir", str(workdir), *data, "--once", "--json", "--nice", "0", *flags])
    finally:
        Workdir.pin = real  # type: ignore[method-assign]
    if code != 0:
        raise RuntimeError(f"evaluator exited {code}")
    rows = [json.loads(line) for line in (workdir / "eval" / "results.jsonl").read_text().splitlines()]
    spans: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        spans[r["checkpoint"]] += [r["started"], r["finished"]]
    ordered = sorted(spans, key=lambda name: min(spans[name]))
    per_checkpoint = [max(spans[n]) - min(spans[n]) for n in ordered[1:]]
    sets = Counter(r["split"] for r in rows)
    return {"secs": per_checkpoint, "pins": dict(Counter(pins)), "rows_per_set": dict(sets),
            "checkpoints": len(ordered)}


def measure(*, steps: int = 600, repeats: int = 3, folder_images: int = 2000,
            data_dir: str | None = None) -> dict[str, Any]:
    """Median seconds per checkpoint of each configuration, measured in alternating rounds."""
    secs: dict[str, list[float]] = {name: [] for name in CONFIGS}
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "run"
        _train(source, data_dir, steps)
        folder = _folder(Path(tmp) / "folder", data_dir, folder_images)
        for repeat in range(repeats):
            for name, flags in CONFIGS.items():
                got = evaluate(source, Path(tmp) / f"{name}-{repeat}", tuple(f.format(folder=folder) for f in flags),
                               data_dir)
                secs[name] += got["secs"]
                if set(got["pins"].values()) != {1} or len(got["pins"]) != got["checkpoints"]:
                    problems.append(f"{name}: pins {got['pins']} for {got['checkpoints']} checkpoints")
    medians = {name: statistics.median(v) for name, v in secs.items() if v}
    return {"secs": secs, "medians": medians, "folder_images": folder_images, "problems": problems}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folder-images", type=int, default=2000)
    p.add_argument("--data-dir")
    args = p.parse_args()
    got = measure(steps=args.steps, repeats=args.repeats, folder_images=args.folder_images, data_dir=args.data_dir)
    print(json.dumps({k: v for k, v in got.items() if k != "secs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
