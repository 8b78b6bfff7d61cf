"""Labels for a foreign frozen graph: a plain file, or Inception's synset map plus its human labels."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from common.errors import UsageError


def read_labels(args: Any) -> list[str]:
    """Line i of `--labels`, or `--synsets` mapped through `--human-labels`; empty when neither is given."""
    if args.labels is not None:
        return _read(args.labels).splitlines()
    if args.synsets is not None and args.human_labels is not None:
        human = dict(line.split("\t", 1) for line in _read(args.human_labels).splitlines() if "\t" in line)
        text = _read(args.synsets)
        classes = re.findall(r"target_class:\s*(\d+)\s*target_class_string:\s*\"([^\"]+)\"", text)
        if not classes:
            raise UsageError(f"{args.synsets}: no 'target_class ... target_class_string' entries")
        size = max(int(i) for i, _ in classes) + 1
        labels = [str(i) for i in range(size)]
        for index, synset in classes:
            labels[int(index)] = human.get(synset, synset).strip()
        return labels
    if args.synsets is not None or args.human_labels is not None:
        raise UsageError("--synsets and --human-labels go together")
    return []


def _read(path: Path) -> str:
    """The file's text, or a one-line UsageError."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
