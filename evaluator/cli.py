"""`evaluator`: not built yet; the entry point exists so that scripts can already name it."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("evaluator: not yet available in this version; the trainer prints final EMA accuracies itself",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
