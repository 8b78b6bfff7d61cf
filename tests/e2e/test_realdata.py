"""Short runs on the real Fashion-MNIST files (`make data` installs them; skipped where absent)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from common.data import datasets
from common.errors import ProjectError
from tests.helpers import Recorder
from trainer.loop import train


def _real_data_or_skip() -> datasets.Dataset:
    try:
        return datasets.load("fashion-mnist", download=False)
    except ProjectError as e:
        pytest.skip(f"real Fashion-MNIST not available here ({e}); run 'make data'")


@pytest.mark.realdata
def test_real_files_have_the_tutorial_splits() -> None:
    data = _real_data_or_skip()
    assert (len(data.train), len(data.validation), len(data.test)) == (55_000, 5_000, 10_000)
    assert sorted(set(data.test.labels.tolist())) == list(range(10))


@pytest.mark.realdata
def test_short_cnn_run_learns_real_data(make_config: Callable[..., Any]) -> None:
    _real_data_or_skip()
    cfg = make_config(model="cnn", batch_size=64, steps=400, save_every=400, data_dir=None, ema_decay=0.99)
    result = train(cfg, reporter=Recorder())
    # 400 steps of the CNN reach about 80% here; chance is 10%.
    assert result.metrics["validation"]["accuracy"] > 0.7
    assert result.metrics["test"]["count"] == 10_000
