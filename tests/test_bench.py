"""The benchmark's quick plan on tiny data: every figure is produced and finite. No timing is asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import run


@pytest.mark.slow
def test_quick_bench_produces_every_figure(tiny_data: Path, tmp_path: Path) -> None:
    assert run.main(["--quick", "--data-dir", str(tiny_data), "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    figures = results["figures"]
    assert set(figures) >= {"B1", "B2", "B3", "B4", "B5", "B6", "B7"}
    numbers = [
        figures["B1"]["ours"]["median"], figures["B1"]["keras_fit_default"]["median"],
        figures["B1"]["keras_fit_no_jit"]["median"], figures["B1"]["ratio"],
        figures["B2"]["cost_fraction"], figures["B3"]["ours"]["median"], figures["B3"]["iterator"]["median"],
        figures["B3"]["ratio"], figures["B4"]["ours"]["median"], figures["B4"]["keras_evaluate"]["median"],
        figures["B5"]["ours"], figures["B5"]["keras_fit"], figures["B6"]["first_mb"], figures["B6"]["last_mb"],
        figures["B7"]["ours"]["median"],
    ]
    assert all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers), numbers
    assert figures["B3"]["ours_evaluated"] == figures["B3"]["checkpoints"]
    assert figures["B6"]["evaluated"] == 5
    assert {"cpu", "cores", "tensorflow", "date"} <= set(results["machine"])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| B1 |" in text and "| B7 |" in text
