"""Which data a `--dataset` name means: a built-in MNIST-family dataset, or a user's own.

A user's data is `folder:PATH`, `npz:PATH` or `module.path:function` (common.data.userdata); any
other name is a built-in dataset (common.data.datasets). The one place that chooses; everything
else asks it.
"""

from __future__ import annotations

from common.data import datasets, userdata


def is_user(name: str) -> bool:
    """Whether `name` names a user's data rather than a built-in dataset."""
    return userdata.is_reference(name)


def check(name: str) -> None:
    """Refuse an unknown built-in dataset (a user's data is not opened here).

    Raises:
      UsageError: the message lists the built-in datasets.
    """
    if not is_user(name):
        datasets.get_info(name)


def is_known(name: str) -> bool:
    """Whether `name` is a built-in dataset or has the form of a user's data (not opened yet)."""
    return is_user(name) or name in datasets.DATASETS


def describe(name: str) -> datasets.DatasetInfo:
    """The dataset's class names, input spec and preprocessing (a folder's images at its default size)."""
    return userdata.describe(name) if is_user(name) else datasets.get_info(name)
