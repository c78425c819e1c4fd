"""``renewing``: the background renewal loop of a lease (no services: the lease is a counter)."""

from __future__ import annotations

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
