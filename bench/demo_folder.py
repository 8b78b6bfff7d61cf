"""`make demo-folder`: the pair on a folder of PNG files and a Keras model of the user's, beside the built-in path.

1. writes Fashion-MNIST as a folder of 32x32 RGB PNG files (12,000 training images, 2,000 in test/);
2. trains `bench.demo_model:small_cnn` on it (`--dataset folder:... --model bench.demo_model:small_cnn`),
   with the evaluator watching beside it;
3. exports the best checkpoint and predicts a few files with the export;
4. trains the built-in CNN on the same number of Fashion-MNIST images (28x28 grey, from the IDX files)
   for as many steps, with the evaluator beside it too, and prints both runs' test accuracy and speed
   (the folder's test split is its 2,000 files, the built-in one the 10,000 t10k images).

    python -m bench.demo_folder [--quick] [--data-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SIZES = {"full": {"train": 12_000, "test": 2_000, "steps": 2_000, "save_every": 500},
         "quick": {"train": 600, "test": 200, "steps": 60, "save_every": 30}}
BATCH_SIZE = 64


def write_folder(root: Path, sizes: dict[str, int], data_dir: str | None) -> list[Path]:
    """Fashion-MNIST as `root/<class>/N.png` and `root/test/<class>/N.png`, 32x32 RGB; return a few test files."""
    import numpy as np
    from PIL import Image

    from common.data import datasets

    data = datasets.load("fashion-mnist", data_dir)
    names = [name.replace("/", "-") for name in data.info.class_names]  # "T-shirt/top" is no folder name
    for split, folder, count in ((data.train, root, sizes["train"]), (data.test, root / "test", sizes["test"])):
        for name in names:
            (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            grey = Image.fromarray(split.images[i]).resize((32, 32), Image.Resampling.BILINEAR)
            Image.fromarray(np.repeat(np.asarray(grey)[..., None], 3, axis=-1)).save(
                folder / names[int(split.labels[i])] / f"{i:05d}.png")
    return [next((root / "test" / name).iterdir()) for name in names[:3]]


def train(workdir: Path, args: list[str], steps: dict[str, int]) -> dict[str, Any]:
    """Run the trainer with the evaluator beside it; return the trainer's figures."""
    run = ["--workdir", str(workdir), "--steps", str(steps["steps"]), "--save-every", str(steps["save_every"]),
           "--batch-size", str(BATCH_SIZE), "--progress", "plain", "--log-every", str(steps["save_every"]), *args]
    evaluator = subprocess.Popen([sys.executable, "-m", "evaluator.cli", "--workdir", str(workdir),
                                  "--exit-when-done", "--progress", "plain"], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    began = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "trainer.cli", *run], check=True, cwd=REPO, capture_output=True,
                             text=True).stdout
    except BaseException:
        evaluator.terminate()  # it would wait for a done.json that will not come
        evaluator.wait()
        raise
    wall = time.perf_counter() - began
    if evaluator.wait(timeout=600) != 0:
        raise SystemExit(f"the evaluator beside the trainer exited {evaluator.returncode}")
    done = json.loads((workdir / "done.json").read_text())
    # The trainer's own speed, from its progress lines (the first one includes tracing: left out).
    rates = [float(m) for m in re.findall(r" progress .*steps_per_sec=([0-9.]+)", out)][1:]
    return {"test_accuracy": done["ema_metrics"]["test"]["accuracy"], "wall_secs": wall,
            "images_per_sec": statistics.median(rates or [steps["steps"] / wall]) * BATCH_SIZE}


def export_and_predict(workdir: Path, files: list[Path]) -> str:
    """Export the best checkpoint and classify `files` with the export; return predict's output."""
    subprocess.run([sys.executable, "-m", "evaluator.cli", "export", "--workdir", str(workdir)], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    export = max((workdir / "export").iterdir(), key=lambda p: int(p.name))
    done = subprocess.run([sys.executable, "-m", "evaluator.serving.predict", "--model", str(export), "--top-k", "1",
                           *map(str, files)], check=True, cwd=REPO, capture_output=True, text=True)
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few hundred images and steps (a smoke test)")
    p.add_argument("--data-dir", help="folder with Fashion-MNIST's IDX files (default: the usual places)")
    p.add_argument("--out", type=Path, help="keep the folder and the workdirs here (default: a temp folder)")
    args = p.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        began = time.perf_counter()
        files = write_folder(root / "images", sizes, args.data_dir)
        print(f"wrote {sizes['train']:,} + {sizes['test']:,} PNG files in {time.perf_counter() - began:.0f} s")
        folder = train(root / "folder-run", ["--dataset", f"folder:{root / 'images'}", "--image-size", "32x32",
                                             "--channels", "3", "--model", "bench.demo_model:small_cnn"],
                       sizes)
        print(export_and_predict(root / "folder-run", files), end="")
        data = ["--data-dir", args.data_dir] if args.data_dir else []
        builtin = train(root / "builtin-run", ["--dataset", "fashion-mnist", "--model", "cnn",
                                               "--train-examples", str(sizes["train"]), *data], sizes)
    for name, result in (("folder + Keras small_cnn, 32x32 RGB", folder), ("built-in cnn, 28x28 grey", builtin)):
        print(f"{name}: test accuracy {100 * result['test_accuracy']:.2f}%, training {result['images_per_sec']:,.0f} "
              f"images/s, {result['wall_secs']:.0f} s in all for {sizes['steps']:,} steps of {BATCH_SIZE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
