"""`python -m common.data.fetch --dataset NAME`: make a dataset available (what `make data` runs).

Order: already present anywhere we look; else the OS package where apt-get exists; else a
download through Keras' `get_file` into the Keras cache.
"""

from __future__ import annotations

import argparse
import sys

from common.data import datasets
from common.errors import ProjectError


def ensure(name: str) -> str:
    """Make dataset `name` loadable; return a line that says where it is."""
    info = datasets.get_info(name)
    try:
        return f"{name}: found in {datasets.load(name, download=False).source}"
    except ProjectError:
        pass
    if datasets.install_os_package(info):
        try:
            return f"{name}: installed OS package {info.os_package}: {datasets.load(name, download=False).source}"
        except ProjectError:
            print(f"{name}: OS package {info.os_package} installed but its files were not found; downloading")
    return f"{name}: downloaded to {datasets.load(name, download=True).source}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.data.fetch", description=__doc__)
    parser.add_argument("--dataset", default=datasets.DEFAULT_DATASET, help="dataset name")
    args = parser.parse_args(argv)
    try:
        print(ensure(args.dataset))
    except ProjectError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
