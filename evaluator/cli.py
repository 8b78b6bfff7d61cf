"""`evaluator`: parse flags, then run the watch loop, the one-shot evaluation or a subcommand.

    evaluator [flags]                 watch a workdir (or --once)
    evaluator best [--json]           print the best checkpoint
    evaluator report [--step N|best]  write a report of one checkpoint
    evaluator export [--step N|best|latest] [--frozen]   write a SavedModel
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from common.cluster import EVALUATOR, read_task
from common.errors import ProjectError, UsageError
from common.storage.paths import local_path, local_text, workdir_path

DEFAULT_WORKDIR = Path("runs") / "fashion-mnist-cnn3x3"  # the trainer's default run (tests/trainer/test_train.py)
DEFAULT_NICE = 10  # evaluations compute with the CPU the trainer leaves (bench B8 measures the pair)
EPILOG = ("Exit codes: 0 done or stopped by a signal, 2 bad input or nothing to show, 4 no data, "
          "5 its files in eval/ or an export could not be written, 6 another process of a multi-worker "
          "evaluation was lost.")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluator", epilog=EPILOG + " Subcommands: 'evaluator best --help', 'evaluator report --help', "
                                          "'evaluator export --help'.",
        description="Evaluate every checkpoint a trainer commits into a workdir (EMA weights by default).")
    _workdir(p)
    p.add_argument("--once", action="store_true", help="evaluate what is pending, print the table and exit")
    p.add_argument("--json", action="store_true", help="with --once: one JSON object per evaluation on stdout")
    p.add_argument("--policy", default="all", choices=["all", "latest"],
                   help="all: every checkpoint, oldest first (default); latest: only the newest")
    p.add_argument("--weights", default="ema", choices=["ema", "raw", "both"], help="weights to evaluate (default ema)")
    _sets(p)
    p.add_argument("--data-dir", type=local_text("--data-dir"),
                   help="folder holding the four IDX files (default: the usual places)")
    p.add_argument("--rescan-secs", type=float, default=10.0, help="rescan without events this often (default 10)")
    p.add_argument("--poll", action="store_true", help="poll instead of inotify (network filesystems)")
    p.add_argument("--poll-secs", type=float, help="polling interval with --poll, and of a bucket workdir "
                   "(default 1; 2 for a bucket)")
    p.add_argument("--exit-when-done", action="store_true",
                   help="watch mode: exit 0 once the finished run's last checkpoint is evaluated")
    p.add_argument("--patience", type=int, default=0,
                   help="ask the trainer to stop after K evaluations without improvement (default 0, off)")
    p.add_argument("--min-delta", type=float, default=0.0,
                   help="an improvement must beat the best by more than this, in the selected metric's units "
                        "(default 0)")
    p.add_argument("--per-class", action="store_true", help="also show per-class accuracy")
    p.add_argument("--name", help="this evaluator's name in the rows it evaluates, when several share the "
                                  "workdir (default HOST:PID)")
    p.add_argument("--progress", default="auto", choices=["auto", "rich", "plain"],
                   help="watch mode display: a live table on a terminal (auto), or plain lines")
    _tf1_graph(p)
    _foreign_loop(p)
    r = p.add_argument_group("machine")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="auto: a GPU when TensorFlow sees one (default); cpu: never; gpu: fail without one")
    r.add_argument("--threads", default="auto", metavar="INTRA[,INTER]",
                   help="TensorFlow thread pools: threads per op and ops at once (default auto: TF's choice)")
    r.add_argument("--nice", type=int, default=DEFAULT_NICE,
                   help=f"niceness of TensorFlow's compute threads, so that a trainer beside it keeps the CPU; "
                        f"the watch loop keeps the shell's priority (default {DEFAULT_NICE}; 0: unchanged)")
    r.add_argument("--strategy", default="default", choices=["auto", "default", "mirrored", "multi-worker"],
                   help="default (one device, the default), auto (mirrored when several GPUs are visible), mirrored "
                        "(all GPUs, or --devices N logical CPUs) or multi-worker (evaluator processes from "
                        "TF_CONFIG, each a shard of every checkpoint); every example counts once")
    r.add_argument("--devices", type=int, default=0, metavar="N", help="mirrored over N logical CPU devices")
    return p


def _sets(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation sets and metrics (docs/evaluator.md)")
    g.add_argument("--split", action="append", choices=["validation", "test"],
                   help="a split of the run's data to evaluate on, repeatable (default validation)")
    g.add_argument("--eval-data", action="append", default=[], metavar="NAME=REF",
                   help="one more set: folder:PATH, npz:PATH or pkg.mod:fn, prepared as the run's images "
                        "(repeatable)")
    g.add_argument("--select", default="", metavar="SET[:METRIC[:max|min]]",
                   help="the result that decides eval/best, --patience and the trainer's retention of the best "
                        "(default validation, accuracy); the other sets are reported only")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="also top-K accuracy (default 0: off)")
    g.add_argument("--metric", action="append", default=[], metavar="PKG.MOD:FN",
                   help="a metric of one's own, fn(labels, logits) per batch: one value per example or the "
                        "batch's mean (repeatable)")
    g.add_argument("--backfill", action="store_true",
                   help="also evaluate the sets added since on checkpoints evaluated before (default: only new "
                        "checkpoints get them)")


def _workdir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=workdir_path("--workdir"), default=DEFAULT_WORKDIR,
                   help=f"the trainer's workdir (default {DEFAULT_WORKDIR})")


def _tf1_graph(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TF1 Saver workdirs (no run.json, no model code: the checkpoint's own .meta graph)")
    g.add_argument("--tf1-graph", action="store_true",
                   help="the workdir holds tf.compat.v1.train.Saver checkpoints (<name>-<step> with a .meta)")
    g.add_argument("--input", help="with --tf1-graph: the images' tensor, e.g. x-input:0 ([N, 784] or [N, 28, 28, 1])")
    g.add_argument("--output", help="with --tf1-graph: the logits' tensor, e.g. layer2/add:0 ([N, classes])")
    g.add_argument("--dataset", help="with --tf1-graph or --model: the dataset fed to it (mnist, fashion-mnist)")


def _foreign_loop(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TF2 checkpoints of other training loops (no run.json: any tf.train.CheckpointManager)")
    g.add_argument("--model", help="the model to build (a model name), with --dataset")
    g.add_argument("--restore-map", action="append", default=[], metavar="SAVED=MODEL",
                   help="with --model: the saved key of model variables, e.g. 'net/*=model/*' (repeatable; one '*')")
    g.add_argument("--ema-map", action="append", default=[], metavar="SAVED=MODEL",
                   help="with --model: the saved key of their moving averages, e.g. 'averages/*=model/*'")


def check_tf1_flags(args: argparse.Namespace, command: str) -> None:
    """Refuse --input, --output or --dataset without --tf1-graph (or --model), and --tf1-graph without them."""
    if getattr(args, "model", None) is not None or getattr(args, "restore_map", None) or getattr(args, "ema_map", None):
        _check_foreign_flags(args)
        return
    given = [f"--{name}" for name in ("input", "output", "dataset") if getattr(args, name, None) is not None]
    if not getattr(args, "tf1_graph", False):
        if given:
            raise UsageError(f"{', '.join(given)} go with --tf1-graph (a TF1 Saver workdir)")
        return
    needed = ("input", "output") if command == "export" else ("input", "output", "dataset")
    missing = [f"--{name}" for name in needed if getattr(args, name) is None]
    if missing:
        raise UsageError(f"--tf1-graph needs {', '.join(missing)} (the workdir has no run.json to say them)")


def _check_foreign_flags(args: argparse.Namespace) -> None:
    """--model needs --dataset; the maps need --model; --tf1-graph's tensors do not go with it."""
    if args.model is None:
        raise UsageError("--restore-map and --ema-map go with --model (another training loop's checkpoints)")
    if args.tf1_graph or args.input is not None or args.output is not None:
        raise UsageError("--model and --tf1-graph (with --input and --output) exclude each other")
    if args.dataset is None:
        raise UsageError("--model needs --dataset: the workdir has no run.json to say which")


def best_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluator best", description="Print the best checkpoint so far.", epilog=EPILOG)
    _workdir(p)
    p.add_argument("--json", action="store_true", help="print eval/best.json as it is (with --select: the ledger row)")
    p.add_argument("--select", metavar="SET[:METRIC[:max|min]]",
                   help="the best of the ledger's results on another set or metric (default: eval/best.json)")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"],
                   help="with --select: whose results (default ema)")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluator report", epilog=EPILOG, description=(
        "Write eval/report-<step>/: confusion matrix (text, PNG), per-class precision/recall/accuracy, "
        "misclassified examples (PNG) and the accuracy curve from the ledger (PNG)."))
    _workdir(p)
    p.add_argument("--step", default="best", help="a step in the ledger, or 'best' (default)")
    p.add_argument("--split", default="validation", choices=["validation", "test"], help="default validation")
    p.add_argument("--data-dir", type=local_text("--data-dir"),
                   help="folder holding the four IDX files (default: the usual places)")
    _tf1_graph(p)
    return p


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluator export", epilog=EPILOG, description=(
        "Write a SavedModel with the chosen weights baked in (default export/<step>/): signatures "
        "serving_default (images as the dataset stores them, e.g. uint8 [N, 28, 28] -> probabilities, "
        "classes, class_names) and "
        "predict_image_bytes (encoded PNG/JPEG bytes [N] -> the same)."))
    _workdir(p)
    p.add_argument("--step", default="best", help="a step number, 'best' (default) or 'latest'")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="default ema")
    p.add_argument("--out", type=local_path("--out"), help="where to write (default <workdir>/export/<step>)")
    p.add_argument("--frozen", action="store_true",
                   help="also write frozen_graph.pb: input images:0, outputs probabilities:0 and classes:0")
    _tf1_graph(p)
    return p


SUBCOMMANDS = {"watch": parser, "best": best_parser, "report": report_parser, "export": export_parser}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in SUBCOMMANDS and argv[0] != "watch" else "watch"
    rest = argv[1:] if command != "watch" else argv
    try:
        args = SUBCOMMANDS[command]().parse_args(rest)
        check_tf1_flags(args, command)
        if command == "watch":
            take_evaluator_task(args)
    except ProjectError as e:
        return _fail(str(e), e.exit_code)
    if command == "watch" and args.json and not args.once:
        return _fail("--json goes with --once", 2)
    try:
        from common.tfenv import Runtime, configure, quiet_import_tensorflow

        runtime = Runtime()  # report and export: any GPU, with memory growth
        if command == "watch":
            runtime = Runtime.from_flags(device=args.device, threads=args.threads, nice=args.nice,
                                         cpu_devices=args.devices)
        quiet_import_tensorflow()
        # Lowering TF's priority starts its runtime, after which TF refuses a multi-worker strategy: the
        # watch command lowers it once it has made its strategy (evaluator.app.run).
        configure(dataclasses.replace(runtime, nice=0))
        from common.run.workdir import Workdir
        from evaluator import app

        workdir = Workdir.open(args.workdir)  # the one opening of the workdir's storage: passed down from here
        {"watch": app.run, "best": app.show_best, "report": app.report, "export": app.export}[command](args, workdir)
    except ProjectError as e:
        return _fail(str(e), e.exit_code)
    return 0


def take_evaluator_task(args: argparse.Namespace) -> None:
    """Act as the `evaluator` task a TF_CONFIG names: a cluster of its own, until the trainer is done.

    TF_CONFIG is removed before TensorFlow starts, so this process never joins the training cluster
    (a chief and its workers list the evaluator but do not wait for it). The task evaluates until
    the trainer has finished and its last checkpoint is evaluated (--exit-when-done), even when the
    chief has finished before this task started; its index names it in the rows (--name).
    """
    task = read_task(os.environ.get("TF_CONFIG"))
    if task is None or task.type != EVALUATOR or args.strategy == "multi-worker":  # that one refuses it
        return
    del os.environ["TF_CONFIG"]
    args.exit_when_done = args.exit_when_done or not args.once
    args.name = args.name or f"{EVALUATOR}-{task.index}"
    print(f"evaluator: TF_CONFIG names this process {EVALUATOR} task {task.index}: evaluating as a cluster of its "
          f"own{'' if args.once else ', until the trainer is done'}", file=sys.stderr, flush=True)


def _fail(message: str, code: int) -> int:
    print(f"evaluator: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
