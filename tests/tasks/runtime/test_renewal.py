"""``renewing``: the background renewal loop of a lease (no services: the lease is a counter)."""

from __future__ import annotations

import itertools
import threading

import pytest

from sftflow.tasks.runtime.polling import Backoff, wait_until
from sftflow.tasks.runtime.renewal import renewing


def test_renews_every_period_until_the_block_ends_then_never_again():
    calls: list[str] = []
    with renewing(lambda: calls.append(threading.current_thread().name) or True, 0.05, name="x") as state:
        assert wait_until(lambda: state.renewed >= 3, timeout_s=5, backoff=Backoff(0.01, 0.05))
    ended = len(calls)
    assert set(calls) == {"renew-x"} and not state.lost  # from its own thread
    assert not wait_until(lambda: len(calls) > ended, timeout_s=0.3, backoff=Backoff(0.05, 0.1))


def test_an_error_is_retried_at_the_next_tick_and_a_lost_lease_stops_the_loop():
    answers = iter([RuntimeError("store unreachable"), True, False])
    calls = []

    def renew() -> bool:
        calls.append(1)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with renewing(renew, 0.05, name="y") as state:
        assert wait_until(lambda: state.lost, timeout_s=5, backoff=Backoff(0.01, 0.05))
        assert state.renewed == 1 and len(calls) == 3
        assert not wait_until(lambda: len(calls) > 3, timeout_s=0.3, backoff=Backoff(0.05, 0.1))


def test_a_period_must_be_positive():
    with pytest.raises(ValueError, match="every_s must be > 0"), renewing(lambda: True, 0, name="z"):
        pass


def test_a_slow_renewal_does_not_stretch_the_period_between_renewals():
    """Renewals start on a fixed cadence: one that takes most of a period (a store slow to
    answer) is not followed by a whole period of waiting, so the gap between two renewals'
    starts stays one period, not a period plus the call. (With a fixed wait after each call, a
    call of 2/3 of a period made the gaps 5/3 of one: a lease of three periods was lost after
    two slow renewals in a row, as a fine-tune claim with a 4 s lease was on a loaded machine.)"""
    import time

    starts: list[float] = []

    def slow() -> bool:
        starts.append(time.monotonic())
        time.sleep(0.2)
        return True

    with renewing(slow, 0.3, name="slow") as state:
        assert wait_until(lambda: state.renewed >= 5, timeout_s=10, backoff=Backoff(0.02, 0.05))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert max(gaps) < 0.4, [round(g, 3) for g in gaps]  # 0.5 with a wait of 0.3 after each call


def test_a_renewal_slower_than_its_period_is_followed_at_once_and_the_late_one_is_logged(caplog):
    import time

    durations = iter([0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    starts: list[float] = []

    def renew() -> bool:
        starts.append(time.monotonic())
        time.sleep(next(durations, 0.0))
        return True

    with caplog.at_level("WARNING", logger="sftflow.tasks.runtime.renewal"), \
            renewing(renew, 0.1, name="late") as state:
        assert wait_until(lambda: state.renewed >= 3, timeout_s=10, backoff=Backoff(0.02, 0.05))
    assert starts[1] - starts[0] < 0.3  # right after the slow one ended, not a period later
    assert any("late" in r.getMessage() and "lease" in r.getMessage() for r in caplog.records), caplog.text
