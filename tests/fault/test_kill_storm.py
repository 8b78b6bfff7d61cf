from __future__ import annotations

from pathlib import Path

from tests.fault.storm import run_storm


def test_kill_storm(tiny_data: Path, tmp_path: Path) -> None:
    """30 SIGKILLs of a real trainer, most inside a save, with a real evaluator watching throughout."""
    stats = run_storm(30, tiny_data, tmp_path / "run", seed=1)
    print(stats.line())
    assert stats.problems == []
    assert stats.kills == 30 and stats.resumes_verified == 29
    assert stats.in_save >= 5, "the storm should hit the save window several times"
    assert stats.broken_reads == 0
    assert stats.evaluations > 0
    assert stats.leftovers_max <= 2  # at most what one interrupted save leaves, cleaned at the next start
