"""`predict`: classify image files with an export, a workdir or a checkpoint, or with a foreign frozen graph.

    predict --model PATH IMG [IMG|DIR ...]
    predict --graph FILE.pb --input NAME --output NAME [--labels FILE | --synsets F --human-labels F] IMG ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common.errors import ProjectError, UsageError
from common.storage.paths import local_path, workdir_path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predict", description=__doc__.split("\n\n")[0], epilog=(
        "Exit codes: 0 all predicted, 1 some file failed (one line each on stderr), 2 bad model or flags."))
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=workdir_path("--model"),
                        help="an export folder, a workdir (best, else latest) or a checkpoint; a workdir or "
                        "checkpoint may be in a bucket (s3://bucket/prefix, gs://bucket/prefix)")
    source.add_argument("--graph", type=local_path("--graph"), help="a foreign frozen GraphDef .pb")
    p.add_argument("images", nargs="+", help="image files or folders (PNG, JPEG, BMP, GIF)")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.add_argument("--no-preprocess", action="store_true", help="only resize to the model's size, e.g. 28x28 "
                   "(no inversion, crop, centring)")
    g = p.add_argument_group("foreign graphs (--graph)")
    g.add_argument("--input", help="input tensor or op name, e.g. DecodeJpeg/contents:0")
    g.add_argument("--output", help="output tensor or op name, e.g. softmax:0")
    g.add_argument("--labels", type=local_path("--labels"), help="one label per line, line i = class i")
    g.add_argument("--synsets", type=Path, help="Inception's label map (target_class -> synset)")
    g.add_argument("--human-labels", type=Path, help="Inception's synset -> human label file")
    g.add_argument("--input-mean", type=float, default=0.0, help="float inputs: (pixel - mean) / std (default 0)")
    g.add_argument("--input-std", type=float, default=255.0, help="float inputs: (pixel - mean) / std (default 255)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        if args.top_k < 1:
            raise UsageError(f"--top-k ({args.top_k}) must be a positive integer")
        from common.tfenv import quiet_gpu_lookup, quiet_import_tensorflow

        quiet_import_tensorflow()
        quiet_gpu_lookup()  # before the first op: stderr holds one line per failed file, nothing of TF's
        from evaluator.serving import backends

        if args.graph is not None:
            classify, names = backends.foreign_graph(args)
        else:
            classify, names = backends.own_model(args.model, preprocess=not args.no_preprocess)
        from evaluator.serving.images import expand

        files = expand(args.images)
        if not files:
            raise UsageError("no image files found in the given folders")
        return report(files, classify(files), names, top_k=args.top_k, as_json=args.json)
    except ProjectError as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return e.exit_code


def report(files: list[Path], results: list[np.ndarray | str], names: list[str], *, top_k: int,
           as_json: bool) -> int:
    """Print one line (or JSON object) per file; return 1 if any file failed, else 0."""
    failed = 0
    for path, result in zip(files, results, strict=True):
        if isinstance(result, str):
            failed += 1
            print(f"predict: error: {path}: {result}", file=sys.stderr)
            continue
        order = np.argsort(-result)[:top_k]
        top = [(_name(names, int(i)), int(i), float(result[i])) for i in order]
        if as_json:
            print(json.dumps({"file": str(path), "class": top[0][0],
                              "top": [{"class": c, "index": i, "probability": p} for c, i, p in top]}))
        else:
            print(f"{path}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, _, p in top))
    return 1 if failed else 0


def _name(names: list[str], i: int) -> str:
    return names[i] if i < len(names) else str(i)


if __name__ == "__main__":
    sys.exit(main())
