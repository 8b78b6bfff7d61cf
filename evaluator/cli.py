"""`evaluator`: parse flags, then run the watch loop or the one-shot evaluation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import ProjectError

DEFAULT_WORKDIR = Path("runs") / "fashion-mnist-cnn"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluator",
        description="Evaluate every checkpoint a trainer commits into a workdir (EMA weights by default).",
        epilog="Exit codes: 0 done or stopped by a signal, 2 bad input or no checkpoint (--once), 4 no data.")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help=f"the trainer's workdir (default {DEFAULT_WORKDIR})")
    p.add_argument("--once", action="store_true", help="evaluate what is pending, print the table and exit")
    p.add_argument("--json", action="store_true", help="with --once: one JSON object per evaluation on stdout")
    p.add_argument("--policy", default="all", choices=["all", "latest"],
                   help="all: every checkpoint, oldest first (default); latest: only the newest")
    p.add_argument("--weights", default="ema", choices=["ema", "raw", "both"], help="weights to evaluate (default ema)")
    p.add_argument("--split", default="validation", choices=["validation", "test"], help="default validation")
    p.add_argument("--data-dir", help="folder holding the four IDX files (default: the usual places)")
    p.add_argument("--rescan-secs", type=float, default=10.0, help="rescan without events this often (default 10)")
    p.add_argument("--poll", action="store_true", help="poll instead of inotify (network filesystems)")
    p.add_argument("--poll-secs", type=float, default=1.0, help="polling interval with --poll (default 1)")
    p.add_argument("--exit-when-done", action="store_true",
                   help="watch mode: exit 0 once the finished run's last checkpoint is evaluated")
    p.add_argument("--progress", default="auto", choices=["auto", "rich", "plain"],
                   help="watch mode display: a live table on a terminal (auto), or plain lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.json and not args.once:
        return _fail("--json goes with --once", 2)
    try:
        from common.tfenv import quiet_import_tensorflow

        quiet_import_tensorflow()
        from evaluator.app import run

        run(args)
    except ProjectError as e:
        return _fail(str(e), e.exit_code)
    return 0


def _fail(message: str, code: int) -> int:
    print(f"evaluator: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
