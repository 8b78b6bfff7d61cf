"""`trainer`: parse flags, then call `trainer.loop.train`. Nothing else lives here."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from common.checkpoint.keymap import parse_map
from common.cluster import EVALUATOR, read_task, without_evaluator
from common.errors import ProjectError, UsageError
from common.storage.paths import local_text, workdir_path, workdir_text

# Settings that define a run (stored in run.json). Unset flags take run.json's value on resume.
RUN_DEFAULTS: dict[str, Any] = {
    "dataset": "fashion-mnist", "model": "cnn3x3", "batch_size": 64, "lr": 1e-3, "lr_decay_rate": 1.0,
    "lr_decay_steps": 1000, "l2": 0.0, "label_smoothing": 0.0, "ema_decay": 0.999, "seed": 0, "classes": (),
    "train_examples": 0, "freeze": (), "unfreeze_at": 0, "finetune_lr": 0.0,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer", description="Train an image classifier into a workdir of crash-safe checkpoints.",
        epilog="Exit codes: 0 done or stopped by a signal, 2 bad input, 3 diverged, 4 no data, 5 write failed, "
               "6 a worker of a multi-worker job was lost.")
    p.add_argument("--workdir", type=workdir_path("--workdir"),
                   help="checkpoint folder, s3://bucket/prefix or gs://bucket/prefix (default runs/<dataset>-<model>)")
    p.add_argument("--dataset", help=f"fashion-mnist, mnist, folder:PATH, npz:PATH or module.path:function "
                   f"(default {RUN_DEFAULTS['dataset']})")
    p.add_argument("--model", help=f"softmax, mlp, cnn, cnn3x3 or module.path:function "
                   f"(default {RUN_DEFAULTS['model']})")
    p.add_argument("--image-size", metavar="HxW", help="folder: datasets: resize images to this, e.g. 32x32 "
                   "(default 256x256)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="folder: datasets: 1 grey or 3 RGB (default 3)")
    p.add_argument("--steps", type=int, help="train until this global step (default: the model's own, 9000 for "
                   "cnn3x3, else 10000)")
    p.add_argument("--batch-size", type=int, help="images per step (default 64)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 0.001)")
    p.add_argument("--lr-decay-rate", type=float, help="exponential decay factor per --lr-decay-steps (default 1, off)")
    p.add_argument("--lr-decay-steps", type=int, help="steps per decay factor (default 1000)")
    p.add_argument("--l2", type=float, help="L2 penalty weight on kernels (default 0)")
    p.add_argument("--label-smoothing", type=float, metavar="X",
                   help="train towards labels moved X of the way to uniform (default: the model's own, "
                        "0.1 for cnn3x3, else 0)")
    p.add_argument("--ema-decay", type=float, help="moving-average decay (default 0.999)")
    p.add_argument("--seed", type=int, help="seed of weights and data order (default 0)")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (default 1000)")
    p.add_argument("--keep", type=int, default=5, help="newest checkpoints kept, 0 = all (default 5)")
    p.add_argument("--keep-every-hours", type=float, default=0.0, help="also keep one per H hours (default 0, off)")
    p.add_argument("--keep-pending", type=int, default=0, metavar="N",
                   help="while an evaluator watches, also keep up to N checkpoints it has not evaluated yet "
                        "(each costs one checkpoint's disk; default 0, off)")
    p.add_argument("--save-mode", choices=["sync", "async"],
                   help="async: the training thread snapshots the variables and a background writer writes and "
                        "commits them; sync: the training thread writes (default async; sync for multi-worker)")
    p.add_argument("--data-dir", type=local_text("--data-dir"),
                   help="folder holding the four IDX files (default: the usual places)")
    p.add_argument("--from", dest="resume_from", type=workdir_text("--from"), metavar="PATH",
                   help="resume from this checkpoint (a name in the workdir, a local prefix, or s3:// or gs://)")
    p.add_argument("--steps-per-loop", type=int, default=20, help="steps per tf.function call (default 20)")
    p.add_argument("--log-every", type=int, default=100, help="steps between plain log lines (default 100)")
    p.add_argument("--progress", default="auto", choices=["auto", "rich", "plain"], help="display (default auto)")
    p.add_argument("--threads", default="auto", metavar="INTRA[,INTER]",
                   help="TensorFlow thread pools: threads per op and ops at once (default auto: TF's choice)")
    _distribution_flags(p)
    _transfer_flags(p)
    return p


def _distribution_flags(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("several devices and workers (tf.distribute)")
    d.add_argument("--strategy", choices=["auto", "default", "mirrored", "multi-worker"],
                   help="auto (mirrored when several GPUs are visible), default, mirrored (all GPUs, or --devices "
                        "N logical CPUs) or multi-worker (from TF_CONFIG) (default auto)")
    d.add_argument("--devices", type=int, default=0, metavar="N", help="mirrored over N logical CPU devices")
    d.add_argument("--workers", type=int, default=0, metavar="N",
                   help="run N local worker processes as one multi-worker job (default 0: this process only)")
    d.add_argument("--evaluators", type=int, default=0, metavar="M",
                   help="also run M evaluators on the workdir, each a TF_CONFIG evaluator task, all ended together "
                        "(default 0)")
    d.add_argument("--collective-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="multi-worker: a worker that waits this long for another ends the job (default 300)")


def _transfer_flags(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("subsets, warm start and transfer")
    t.add_argument("--classes", help="train on these classes only, relabelled in this order: 5,6,7 or Sandal,Shirt")
    t.add_argument("--train-examples", type=int, help="use only the first N training images (default all)")
    t.add_argument("--init-from", type=workdir_text("--init-from"), metavar="CKPT_OR_WORKDIR",
                   help="initialise from another run (first start only)")
    t.add_argument("--init-map", action="append", default=[], metavar="OLD=NEW",
                   help="restore saved OLD into NEW; one '*' each, e.g. model/fc1/*=model/fc2/*")
    t.add_argument("--init-only", action="append", default=[], metavar="PATTERN",
                   help="restore only model variables matching this, e.g. 'model/conv*'")
    t.add_argument("--init-weights", default="ema", choices=["ema", "raw"], help="source weights (default ema)")
    t.add_argument("--freeze", action="append", default=None, metavar="PATTERN",
                   help="do not train variables matching this, e.g. 'model/conv*'")
    t.add_argument("--unfreeze-at", type=int, help="from this step every variable trains at --finetune-lr")
    t.add_argument("--finetune-lr", type=float, help="learning rate after --unfreeze-at")


def default_workdir(dataset: str, model: str) -> Path:
    """The workdir of a run without --workdir: runs/<dataset>-<model>."""
    from common.data import userdata

    return Path("runs") / f"{userdata.short_name(dataset)}-{userdata.short_name(model)}"


def build_config(args: argparse.Namespace) -> Any:
    """Merge flags with the defaults, or with the workdir's run.json when resuming."""
    from common.data import datasets, userdata
    from common.data import registry as data_registry
    from common.model import models
    from common.model import registry as model_registry
    from common.run.spec import RunSpec, read_run
    from common.run.workdir import Workdir
    from trainer.config import TrainConfig

    given = {k: getattr(args, k) for k in RUN_DEFAULTS if getattr(args, k) is not None}
    if "dataset" in given:
        given["dataset"] = userdata.absolute(given["dataset"])
    for name, names, is_known in (("dataset", datasets.DATASETS, data_registry.is_known),
                                  ("model", models.MODELS, model_registry.is_known)):
        if name in given and not is_known(given[name]):
            raise UsageError(f"unknown {name} {given[name]!r} (choose one of: {', '.join(sorted(names))}, "
                             f"or {'folder:PATH, npz:PATH or ' if name == 'dataset' else ''}module.path:function)")
    if "freeze" in given:
        given["freeze"] = tuple(given["freeze"])
    dataset = given.get("dataset", RUN_DEFAULTS["dataset"])
    model = given.get("model", RUN_DEFAULTS["model"])
    if "classes" in given:
        if data_registry.is_user(dataset):
            raise UsageError(f"--classes goes with the built-in datasets, not {dataset}")
        given["classes"] = datasets.parse_classes(given["classes"], datasets.get_info(dataset))
    workdir = args.workdir or default_workdir(dataset, model)
    opened = Workdir.open(workdir)  # the program's one opening of the workdir: it travels in the config
    existing = read_run(opened.storage)
    base = ({k: getattr(existing, k) for k in RUN_DEFAULTS} if existing
            else RUN_DEFAULTS | {"label_smoothing": models.recipe(model).label_smoothing})
    settings = base | given
    spec = RunSpec(**settings, **_data_fields(settings, existing, args))
    init = None
    if args.init_from is not None:
        from trainer.warmstart import InitSpec

        maps = [parse_map(text, "--init-map") for text in args.init_map]
        init = InitSpec(source=args.init_from, weights=args.init_weights, maps=tuple(maps),
                        only=tuple(args.init_only))
    elif args.init_map or args.init_only:
        raise UsageError("--init-map and --init-only go with --init-from")
    return TrainConfig(
        spec=spec, workdir=workdir, steps=args.steps if args.steps is not None else models.recipe(spec.model).steps,
        save_every=args.save_every, keep=args.keep, keep_every_hours=args.keep_every_hours,
        keep_pending=args.keep_pending, save_mode=args.save_mode, data_dir=args.data_dir, resume_from=args.resume_from,
        steps_per_loop=args.steps_per_loop, log_every=args.log_every, progress=args.progress, init=init, opened=opened,
    )


def _data_fields(settings: dict[str, Any], existing: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The class names, and for a user's data its input spec and preprocessing (a resume keeps run.json's)."""
    from common.data import datasets, userdata
    from common.data import registry as data_registry

    dataset = settings["dataset"]
    image_size = None if args.image_size is None else userdata.parse_image_size(args.image_size)
    if not data_registry.is_user(dataset):
        if image_size is not None or args.channels is not None:
            raise UsageError(f"--image-size and --channels go with folder: datasets; {dataset} is "
                             f"{datasets.get_info(dataset).input_spec.describe()}")
        all_names = datasets.get_info(dataset).class_names
        return {"class_names": tuple(all_names[i] for i in settings["classes"]) if settings["classes"] else all_names}
    if existing is not None and existing.dataset == dataset and image_size is None and args.channels is None:
        return {"class_names": existing.class_names, "input_spec": existing.input, "preprocessing": existing.prep}
    info = userdata.describe(dataset, image_size=image_size, channels=args.channels)
    return {"class_names": info.class_names, "input_spec": info.input_spec, "preprocessing": info.preprocessing}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        args = parser().parse_args(argv)
        if args.workers or args.evaluators:
            return _launch(args, sys.argv[1:] if argv is None else argv)
        _join_training_cluster()
        from common.tfenv import Runtime, configure, quiet_import_tensorflow

        runtime = Runtime.from_flags(threads=args.threads, cpu_devices=args.devices)
        quiet_import_tensorflow()
        configure(runtime)
        from common.distribute import make_strategy
        from trainer.loop import train

        cfg = build_config(args)
        if args.collective_timeout <= 0:
            raise UsageError(f"--collective-timeout ({args.collective_timeout}) must be positive")
        strategy = make_strategy(args.strategy or "auto", devices=args.devices,
                                 collective_timeout=args.collective_timeout)
        train(cfg, strategy=strategy)
    except ProjectError as e:
        print(f"trainer: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("trainer: interrupted before training started; nothing saved", file=sys.stderr)
        return 130
    return 0


def _join_training_cluster() -> None:
    """Refuse an evaluator's TF_CONFIG; drop the evaluator job from a chief's or worker's (a cluster of its own)."""
    text = os.environ.get("TF_CONFIG")
    task = read_task(text)
    if task is None or text is None:
        return
    if task.type == EVALUATOR:
        raise UsageError("TF_CONFIG names an evaluator task: run `evaluator` for it (the trainer runs the chief "
                         "and worker tasks)")
    os.environ["TF_CONFIG"] = without_evaluator(text)


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """`--workers N`, `--evaluators M`: N local workers running these flags, and M evaluators (trainer.launcher)."""
    from trainer.launcher import launch

    if args.workers < 0 or args.evaluators < 0:
        raise UsageError(f"--workers ({args.workers}) and --evaluators ({args.evaluators}) must not be negative")
    if args.workers and args.strategy not in (None, "multi-worker"):
        raise UsageError(f"--workers runs a multi-worker job; drop --strategy {args.strategy}")
    if args.workers and args.save_mode == "async":
        raise UsageError("--save-mode async: the saves of --workers are collective (every worker writes its part on "
                         "its training thread); use --save-mode sync, the default there")
    if args.workers and args.devices:
        raise UsageError("--devices goes with --strategy mirrored, not --workers")
    workdir = args.workdir or default_workdir(args.dataset or RUN_DEFAULTS["dataset"],
                                              args.model or RUN_DEFAULTS["model"])
    evaluator = ["--workdir", str(workdir), "--progress", "plain"]
    evaluator += ["--data-dir", args.data_dir] if args.data_dir else []
    return launch(args.workers, argv, evaluators=args.evaluators, evaluator_argv=evaluator)


if __name__ == "__main__":
    sys.exit(main())
