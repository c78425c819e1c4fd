"""Prefect's flow-run heartbeat thread, stopped as soon as its run ends.

Prefect 3.8.8 runs every flow run (heartbeats are on by default:
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` 180 s; sftflow's deployments use 30 s) with a thread that
emits a heartbeat event, then sleeps in whole seconds, checking its stop event between them.
The engine joins that thread when the run ends, so every flow run ended 0-1 s late: 0.47 s of
a 5.6 s incremental build (cProfile: ``threading.join`` under ``_send_heartbeats``), and as
much for each of the many short flow runs of the deployments and the tests.

``install`` puts :func:`send_heartbeats` in its place: the same loop, the same events, the same
checks, but it waits on the stop event itself, so the join returns at once. Only for the
Prefect version it was written against (``requirements/constraints.txt`` pins it); any other
keeps Prefect's own, whose behaviour is then unchanged but for those seconds.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

#: The Prefect release whose ``flow_engine._send_heartbeats`` this replaces.
PREFECT_VERSION = "3.8.8"


@contextmanager
def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Generator[None, None, None]:
    """Prefect 3.8.8's ``_send_heartbeats``, waiting on its stop event instead of sleeping."""
    from prefect.flow_engine import MINIMUM_HEARTBEAT_INTERVAL

    heartbeat_seconds = engine.heartbeat_seconds
    if heartbeat_seconds is None:
        yield
        return
    heartbeat_seconds = max(heartbeat_seconds, MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop_event = threading.Event()

    def heartbeat_loop() -> None:
        while not stop_event.is_set():
            run = engine.flow_run
            if run and run.state and run.state.is_final():
                engine.logger.debug("Flow run in terminal state, stopping heartbeat")
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            stop_event.wait(heartbeat_seconds)

    # Prefect's reason, kept: the thread must see the caller's settings (its API URL), or the
    # heartbeat path may start an ephemeral server during the flow's teardown.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(heartbeat_loop,),
                              daemon=True)
    thread.start()
    engine.logger.debug("Started flow run heartbeat context")
    try:
        yield
    finally:
        stop_event.set()
        if join_on_exit:
            thread.join(timeout=2)
        engine.logger.debug("Stopped flow run heartbeat context")


def install() -> bool:
    """Use :func:`send_heartbeats` for Prefect's flow runs in this process; True when it is in
    place (Prefect is the version it was written against)."""
    import prefect
    from prefect import flow_engine

    if prefect.__version__ != PREFECT_VERSION or not hasattr(flow_engine, "_send_heartbeats"):
        return False
    flow_engine._send_heartbeats = send_heartbeats
    return True
