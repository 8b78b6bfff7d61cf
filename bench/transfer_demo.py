"""The transfer-learning demonstration: pre-train on Fashion-MNIST classes 0-4, transfer to 5-9 with
1,000 labelled images (the pre-trained layers frozen under a new top, then fine-tuning), against
the same model trained from scratch on the same 1,000 images for the same number of steps.

    python -m bench.transfer_demo [--quick] [--data-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {"full": {"pretrain": 3000, "steps": 2000, "unfreeze": 500},
         "quick": {"pretrain": 600, "steps": 400, "unfreeze": 100}}
FINETUNE_LR = "0.0003"


def commands(root: Path, sizes: dict[str, int], data: list[str]) -> dict[str, list[str]]:
    """The three trainer command lines of the demonstration."""
    common = ["--model", "cnn", "--progress", "plain", "--log-every", "100000", *data]
    target = ["--classes", "5,6,7,8,9", "--train-examples", "1000", "--steps", str(sizes["steps"]),
              "--save-every", str(sizes["steps"])]
    return {
        "pretrain": ["--workdir", str(root / "pretrain"), "--classes", "0,1,2,3,4", "--steps", str(sizes["pretrain"]),
                     "--save-every", str(sizes["pretrain"]), *common],
        # The convolutions come from the pre-trained run and stay frozen while a new top (fc1, fc2)
        # learns; then everything is fine-tuned at a lower learning rate.
        "transfer": ["--workdir", str(root / "transfer"), *target, "--init-from", str(root / "pretrain"),
                     "--init-only", "model/conv*", "--freeze", "model/conv*", "--unfreeze-at", str(sizes["unfreeze"]),
                     "--finetune-lr", FINETUNE_LR, *common],
        "scratch": ["--workdir", str(root / "scratch"), *target, *common],
    }


def run(root: Path, quick: bool, data_dir: str | None) -> dict[str, float]:
    """Run the three trainings; return the final EMA test accuracy of transfer and scratch."""
    data = ["--data-dir", data_dir] if data_dir else []
    results = {}
    for name, args in commands(root, SIZES["quick" if quick else "full"], data).items():
        subprocess.run([sys.executable, "-m", "trainer.cli", *args], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        done = json.loads((root / name / "done.json").read_text())
        results[name] = done["ema_metrics"]["test"]["accuracy"]
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir")
    p.add_argument("--out", type=Path, help="keep the three workdirs here (default: a temp folder)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        results = run(root, args.quick, args.data_dir)
    print(f"pre-train (classes 0-4) test accuracy {100 * results['pretrain']:.2f}%")
    print(f"transfer  (classes 5-9, 1,000 images) test accuracy {100 * results['transfer']:.2f}%")
    print(f"scratch   (classes 5-9, 1,000 images) test accuracy {100 * results['scratch']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
