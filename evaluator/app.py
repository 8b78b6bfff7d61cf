"""Wire flags to the loops and displays (kept out of cli.py so that `--help` needs no TensorFlow)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console, Group

from common.signals import StopRequest, stop_on_signals
from evaluator.display import Display, LiveTable, PlainLines, header_text, render_table
from evaluator.session import EvalConfig, json_lines, run_once, run_watch


def config_from(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(workdir=args.workdir, split=args.split, weights=args.weights, policy=args.policy,
                      data_dir=args.data_dir, rescan_secs=args.rescan_secs, poll=args.poll,
                      poll_secs=args.poll_secs, exit_when_done=args.exit_when_done)


def run(args: argparse.Namespace) -> None:
    cfg = config_from(args)
    if args.once:
        session = run_once(cfg)
        if args.json:
            sys.stdout.write(json_lines(session))
        else:
            console = Console() if sys.stdout.isatty() else Console(width=160)
            console.print(Group(header_text(session.status(0)),
                                  render_table(session.rows(), both=cfg.weights == "both")))
        return
    display: Display
    if args.progress == "rich" or (args.progress == "auto" and sys.stdout.isatty()):
        display = LiveTable(both=cfg.weights == "both")
    else:
        display = PlainLines()
    stop = StopRequest()
    try:
        with stop_on_signals(stop):
            run_watch(cfg, display, stop)
    finally:
        display.close()
    if stop:
        display.message(f"evaluator stopped by {stop.reason}")
