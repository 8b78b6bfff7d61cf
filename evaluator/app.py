"""Wire flags to the loops and displays (kept out of cli.py so that `--help` needs no TensorFlow)."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console, Group

from common.checkpoint.keymap import parse_map
from common.checkpoint.tf1graph import GraphFlags
from common.errors import UsageError
from common.layout import BEST_LINK, EVAL_DIR
from common.run.ledger import Ledger
from common.run.workdir import Workdir
from common.signals import StopRequest, stop_on_signals
from common.tfenv import lower_priority
from evaluator.best import ranked
from evaluator.cluster import Cluster
from evaluator.config import EvalConfig, default_name
from evaluator.display import Display, Layout, LiveTable, PlainLines, header_text, per_class_tables, render_table
from evaluator.foreign import ForeignFlags
from evaluator.loop import json_lines, run_once, run_watch, run_worker
from evaluator.sets import Selection, parse_eval_data, show_value

WIDE = 400  # --once's table width when not on a terminal (several sets make many columns)


def config_from(args: argparse.Namespace, workdir: Workdir) -> EvalConfig:
    return EvalConfig(workdir=args.workdir, splits=tuple(args.split or ("validation",)),
                      eval_data=parse_eval_data(args.eval_data), select=args.select, top_k=args.top_k,
                      metrics=tuple(args.metric), backfill=args.backfill, weights=args.weights, policy=args.policy,
                      data_dir=args.data_dir, rescan_secs=args.rescan_secs, poll=args.poll,
                      poll_secs=_poll_secs(args, workdir), exit_when_done=args.exit_when_done, patience=args.patience,
                      min_delta=args.min_delta, per_class=args.per_class, graph=graph_flags(args),
                      foreign=foreign_flags(args), strategy=args.strategy, devices=args.devices,
                      name=args.name or default_name())


def _poll_secs(args: argparse.Namespace, workdir: Workdir) -> float:
    """--poll-secs, by default the storage's (1 s; 2 s for a bucket: each poll is a few requests over the network)."""
    return float(args.poll_secs) if args.poll_secs is not None else workdir.storage.default_poll_secs


def foreign_flags(args: argparse.Namespace) -> ForeignFlags | None:
    """What --model, --dataset, --restore-map and --ema-map say (cli.py checked that they go together)."""
    if getattr(args, "model", None) is None:
        return None
    return ForeignFlags(model=args.model, dataset=args.dataset,
                        restore_maps=tuple(parse_map(t, "--restore-map") for t in args.restore_map),
                        ema_maps=tuple(parse_map(t, "--ema-map") for t in args.ema_map))


def graph_flags(args: argparse.Namespace) -> GraphFlags | None:
    """What --tf1-graph, --input, --output and --dataset say (cli.py checked that they go together)."""
    if not args.tf1_graph:
        return None
    return GraphFlags(input=args.input, output=args.output, dataset=args.dataset)


def run(args: argparse.Namespace, workdir: Workdir) -> None:
    cfg = config_from(args, workdir)
    cluster = Cluster.make(cfg.strategy, cfg.devices)  # first: a multi-worker strategy must come before any op
    if args.nice:
        lower_priority(args.nice)
    if cfg.strategy != "default":
        print(f"evaluator: {cluster.topo.line()}", file=sys.stderr, flush=True)
    if not cluster.topo.chief:
        taken = run_worker(cfg, workdir, cluster, wait=not args.once)
        print(f"evaluator: worker {cluster.topo.worker}: took part in {taken} evaluation(s); the chief is done",
              file=sys.stderr)
        return
    with cluster.leading():
        _lead(args, cfg, workdir, cluster)


def _lead(args: argparse.Namespace, cfg: EvalConfig, workdir: Workdir, cluster: Cluster) -> None:
    """What a lone evaluator, or the chief of several, does: evaluate, record and show."""
    if args.once:
        session = run_once(cfg, workdir, cluster=cluster)
        if args.json:
            sys.stdout.write(json_lines(session))
            for text in session.notes:  # the header that shows them is not printed
                print(f"evaluator: warning: {text}", file=sys.stderr)
        else:
            # Into a file or a pipe, every column of every set keeps its width: nothing wraps a line there.
            console = Console() if sys.stdout.isatty() else Console(width=WIDE)
            status = session.status(0)
            console.print(Group(header_text(status), render_table(session.rows(), layout_of(cfg)),
                                *per_class_tables(session.rows(), status)))
        return
    display: Display
    if args.progress == "rich" or (args.progress == "auto" and sys.stdout.isatty()):
        display = LiveTable(layout_of(cfg))
    else:
        display = PlainLines()
    stop = StopRequest()
    try:
        with stop_on_signals(stop):
            run_watch(cfg, display, stop, workdir, cluster=cluster)
    finally:
        display.close()
    if stop:
        display.message(f"evaluator stopped by {stop.reason}")


def layout_of(cfg: EvalConfig) -> Layout:
    """The table's columns for these flags: a group per set, and the metrics they compute."""
    return Layout(sets=cfg.set_names, both=cfg.weights == "both", metrics=cfg.extra_metrics,
                  decides=cfg.selection.metric if cfg.selection is not None else "accuracy")


def show_best(args: argparse.Namespace, workdir: Workdir) -> None:
    if args.select:
        _show_ranked(args, workdir, Selection.parse(args.select))
        return
    best = workdir.best()
    if best is None:
        raise UsageError(f"{args.workdir}: no best checkpoint yet (the evaluator keeps it from validation results)")
    if args.json:
        print(json.dumps(best.to_json(), sort_keys=True))
        return
    metric = best.metric or "accuracy"
    value = show_value(metric, best.value if best.value is not None else best.accuracy)
    print(f"best: {best.checkpoint} (step {best.step}) {best.split} {metric} {value} "
          f"(accuracy {show_value('accuracy', best.accuracy)}, loss {best.loss or 0.0:.4f}; {best.weights} weights), "
          f"kept in {workdir.describe(f'{EVAL_DIR}/{BEST_LINK}')}")


def _show_ranked(args: argparse.Namespace, workdir: Workdir, selection: Selection) -> None:
    """`best --select`: the ledger's best result on a set and metric, which eval/best need not keep."""
    ledger = Ledger(workdir.storage)
    records = ledger.read()
    top = ranked(records, selection, weights=args.weights)
    if not top:
        sets = sorted({str(r.get("split")) for r in records if r.get("status") == "ok"})
        raise UsageError(f"{args.workdir}: the ledger holds no {args.weights} result of {selection.set} "
                         f"{selection.metric} (its sets: {', '.join(sets) or 'none'})")
    row = top[0]
    if args.json:
        print(json.dumps(row.to_json(), sort_keys=True))
        return
    print(f"best on {selection.describe()}: {row.checkpoint} (step {row.step}) {selection.metric} "
          f"{show_value(selection.metric, selection.value(row.fields))} ({args.weights} weights; "
          f"{len(top)} result(s) ranked, from {ledger.where})")


def report(args: argparse.Namespace, workdir: Workdir) -> None:
    from evaluator.report import write_report

    out = write_report(workdir, step=args.step, split_name=args.split, data_dir=args.data_dir,
                       graph=graph_flags(args))
    print(f"report written to {out}/")
    for name in workdir.storage.names(f"{EVAL_DIR}/{out.name}"):
        print(f"  {name}")
    _warn_skipped_ledger_lines(workdir)


def _warn_skipped_ledger_lines(workdir: Workdir) -> None:
    """Say that the report left out ledger lines it could not read (not UTF-8, not JSON)."""
    ledger = Ledger(workdir.storage)
    ledger.read()
    if ledger.skipped:
        print(f"evaluator: warning: skipped {ledger.skipped} unreadable line(s) of "
              f"{ledger.storage.describe(ledger.key)}", file=sys.stderr)


def export(args: argparse.Namespace, workdir: Workdir) -> None:
    from evaluator.serving.export import FROZEN_FILE, FROZEN_INPUT, FROZEN_OUTPUTS
    from evaluator.serving.export import export as write_export

    graph = graph_flags(args)
    if graph is not None:
        from evaluator.serving.tf1export import export_graph

        out = export_graph(workdir, graph, step=args.step, weights=args.weights, out=args.out,
                           frozen=args.frozen)
    else:
        out = write_export(workdir, step=args.step, weights=args.weights, out=args.out, frozen=args.frozen)
    print(f"SavedModel written to {out}/ ({args.weights} weights)")
    if args.frozen:
        outputs = ", ".join(f"{name}:0" for name in FROZEN_OUTPUTS)
        print(f"frozen graph: {out / FROZEN_FILE} (input {FROZEN_INPUT}:0, outputs {outputs})")
