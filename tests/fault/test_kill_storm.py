from __future__ import annotations

from pathlib import Path

from tests.fault.storm import run_storm


def test_kill_storm(tiny_data: Path, tmp_path: Path) -> None:
    """5 SIGKILLs of a real trainer, most inside a save, with a real evaluator watching throughout.

    The trainer saves with `--save-mode async`: a kill inside a save lands while its writer thread
    writes (the training thread goes on), and every resume must still start from the last commit.

    Each relaunch imports TensorFlow (about 5 s of CPU on two cores), so `make test` runs this short
    form; `make soak` runs 300 kills (`python -m tests.fault.storm --kills 300`).
    """
    stats = run_storm(5, tiny_data, tmp_path / "run", seed=1, save_mode="async")  # seed 1 aims 4 of 5 kills at a save
    print(stats.line())
    assert stats.problems == []
    assert stats.kills == 5 and stats.resumes_verified == 4
    assert stats.in_save >= 2, "the storm should hit the save window several times"
    assert stats.saves_logged.get("async", 0) > 0 and set(stats.saves_logged) == {"async"}
    assert stats.broken_reads == 0
    assert stats.evaluations > 0
    assert stats.leftovers_max <= 2  # at most what one interrupted save leaves, cleaned at the next start
