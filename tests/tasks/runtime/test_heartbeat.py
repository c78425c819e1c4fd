"""The flow-run heartbeat thread: stopped at once when its run ends, heartbeats unchanged."""

from __future__ import annotations

import logging
import threading
import time

import prefect
from prefect import flow_engine

from sftflow.tasks.runtime import declare, heartbeat


class _Engine:
    """What the heartbeat context reads of Prefect's flow-run engine, recording its events."""

    def __init__(self, seconds: int | None) -> None:
        self.heartbeat_seconds = seconds
        self.flow_run = None
        self.logger = logging.getLogger("test-heartbeat")
        self.sent: list[float] = []
        self.first = threading.Event()

    def _build_heartbeat_event_template(self) -> tuple[dict, list]:
        return {"prefect.resource.id": "prefect.flow-run.test"}, []

    def _emit_flow_run_heartbeat(self, resource: dict, related: list) -> None:
        self.sent.append(time.monotonic())
        self.first.set()


def _exit_seconds(context) -> tuple[float, _Engine]:
    engine = _Engine(180)
    with context(engine):
        assert engine.first.wait(5), "no heartbeat at the run's start"
        time.sleep(0.05)  # the thread is now between heartbeats
        ended = time.monotonic()
    return time.monotonic() - ended, engine


def test_the_run_ends_without_waiting_for_the_heartbeat_thread() -> None:
    # Prefect's own loop sleeps in whole seconds: its join took ~0.95 s here
    waited, engine = _exit_seconds(heartbeat.send_heartbeats)
    assert waited < 0.5
    assert len(engine.sent) == 1  # one heartbeat at the start, the next due in 180 s


def _heartbeat_threads() -> list[threading.Thread]:
    """Live threads running a heartbeat loop (other threads of the process come and go)."""
    return [t for t in threading.enumerate()
            if any(getattr(a, "__name__", "") == "heartbeat_loop" for a in getattr(t, "_args", ()))]


def test_no_heartbeat_thread_when_heartbeats_are_off() -> None:
    engine = _Engine(None)
    with heartbeat.send_heartbeats(engine):
        assert _heartbeat_threads() == []
    assert engine.sent == []
    with heartbeat.send_heartbeats(_Engine(180)):  # the check sees one when they are on
        assert len(_heartbeat_threads()) == 1
    assert _heartbeat_threads() == []


def test_installed_for_the_pinned_prefect() -> None:
    assert declare.heartbeat is heartbeat
    assert prefect.__version__ == heartbeat.PREFECT_VERSION, (
        "Prefect changed: compare flow_engine._send_heartbeats with heartbeat.send_heartbeats "
        "and update PREFECT_VERSION")
    assert flow_engine._send_heartbeats is heartbeat.send_heartbeats
