"""Time per phase of a run."""

from __future__ import annotations

import pytest

from sftflow.tasks.runtime.progress import PhaseTimer


def test_phase_timer_adds_up_each_phase_even_when_it_raises():
    now = [100.0]
    timer = PhaseTimer(clock=lambda: now[0])
    for step in (1.5, 0.25):
        with timer.phase("read"):
            now[0] += step
    with pytest.raises(RuntimeError), timer.phase("import_wait"):
        now[0] += 2.0004
        raise RuntimeError
    assert timer.seconds() == {"read": 1.75, "import_wait": 2.0}
    assert timer.elapsed() == pytest.approx(3.7504)
