from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault.mw_storm import run_storm


@pytest.mark.slow
def test_multi_worker_kill_storm(tiny_data: Path, tmp_path: Path) -> None:
    """2 SIGKILLs of a random worker of a 2-worker job (the chief included), with a real evaluator watching.

    Each relaunch resumes from exactly the chief's last committed checkpoint, and each kill ends the
    job with the launcher's line naming the killed worker, without a hang. About 15 s a kill here (two
    TensorFlow imports per relaunch on two cores); `make soak` runs 50.
    """
    stats = run_storm(2, tiny_data, tmp_path / "run", seed=3)  # seed 3 draws the chief, then the other
    print(stats.line())
    assert stats.problems == []
    assert stats.kills == 2 and stats.resumes_verified == 2 and stats.lost_lines_verified == 2
    assert stats.chief_kills == 1, "the storm should kill the chief and the other worker"
    assert stats.broken_reads == 0
    assert stats.evaluations > 0
