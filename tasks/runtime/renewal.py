"""Keep a lease alive while work runs: ``renew()`` every ``every_s`` seconds from a thread.

A leased record (a lock, a claim) lives for a fixed time unless its holder renews it; a holder
that renews every third of the lease is never overtaken while it lives and reaches the store
(it would have to miss two renewals in a row), and one that dies (SIGKILL, power cut) renews
nothing, so its lease runs out and the next contender takes over. ``renewing`` is that loop:

- renewals start on a fixed cadence, every ``every_s`` from the block's start, not ``every_s``
  after the previous one ended: a renewal slow to answer (a loaded store) does not push the
  next one back, and one that took longer than a period is followed at once. (With a wait
  after each call, two renewals of 2/3 of a period lost a lease of three periods; a 4 s
  fine-tune claim was taken over from its live holder that way on a loaded machine.) A
  renewal that succeeds more than two periods after the previous success is logged: the
  lease was at risk;
- ``renew()`` returns True (renewed) or False (nothing left to renew: the lease was taken over
  or the work it guards is done); on False the loop stops and ``Renewal.lost`` says so;
- an error is logged and tried again at the next tick (a store unreachable for a whole lease
  loses it, as it should);
- leaving the block stops the loop (and waits a little for a renewal in flight).

Used by the locks (``S3Lock.held``, ``tasks/versions/locks.py``) and the fine-tune submission
claim (``tasks/finetune/lineage.py``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

_log = logging.getLogger(__name__)


@dataclass
class Renewal:
    """What the background loop did so far: renewals that succeeded, and whether it stopped
    because ``renew()`` said the lease is gone."""

    renewed: int = 0
    lost: bool = False


@contextlib.contextmanager
def renewing(renew: Callable[[], bool], every_s: float, *, name: str) -> Iterator[Renewal]:
    """Call ``renew()`` every ``every_s`` seconds in a daemon thread while the block runs."""
    if every_s <= 0:
        raise ValueError("every_s must be > 0")
    stop = threading.Event()
    state = Renewal()

    def loop() -> None:
        last_ok = time.monotonic()
        due = last_ok + every_s
        while not stop.wait(max(0.0, due - time.monotonic())):
            try:
                renewed = renew()
            except Exception as err:  # noqa: BLE001 - a failed renewal is retried at the next tick
                _log.warning("renewing %s failed (retried in %.1f s): %s", name, every_s, err)
                renewed = None
            now = time.monotonic()
            due = max(due + every_s, now)  # a call longer than a period: the next at once, no burst
            if renewed is False:
                state.lost = True
                return
            if renewed:
                state.renewed += 1
                if now - last_ok > 2 * every_s:
                    _log.warning("renewing %s: renewed %.1f s after the previous renewal, late for a "
                                 "period of %.1f s (the lease lasts about three)", name, now - last_ok,
                                 every_s)
                last_ok = now

    thread = threading.Thread(target=loop, name=f"renew-{name}", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join(timeout=5)
