"""The one way to wait and the one way to retry: exponential backoff with jitter, to a deadline.

- ``Backoff``: a bounded schedule of pauses between two intervals. Every delay lies in
  ``[min_interval_s, max_interval_s]`` (except the last one, cut short at the deadline), so a
  wait of T seconds polls at most ``T / min_interval_s + 2`` times: that is the API-call budget
  of ``wait_for_annotations``.
- ``wait_until(probe, ...)``: poll until ``probe()`` returns something truthy or the deadline.
- ``retry(fn, ...)``: call ``fn`` until it succeeds, ``retry_if`` says an error is final, or
  the attempts or the deadline run out.
- ``is_transient(err)``: the one default answer to "could trying again help?" Prefect's
  ``io_task`` retries use it too (``tasks/runtime/declare.py``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from sftflow.core.errors import SftflowError

T = TypeVar("T")


@dataclass
class Backoff:
    min_interval_s: float
    max_interval_s: float
    factor: float = 2.0
    jitter: float = 0.25  # +- this fraction, then clamped to the interval bounds
    rng: random.Random = field(default_factory=random.Random)
    _interval: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.min_interval_s <= self.max_interval_s:
            raise ValueError("need 0 < min_interval_s <= max_interval_s")
        self._interval = self.min_interval_s

    def next_delay(self, progressed: bool = False) -> float:
        """The pause before the next poll. Progress resets the interval to the minimum."""
        if progressed:
            self._interval = self.min_interval_s
        delay = self._interval * (1 + self.rng.uniform(-self.jitter, self.jitter))
        self._interval = min(self.max_interval_s, self._interval * self.factor)
        return min(self.max_interval_s, max(self.min_interval_s, delay))

    def max_polls(self, timeout_s: float) -> int:
        """An upper bound on polls within ``timeout_s`` (the first poll is immediate)."""
        return math.floor(timeout_s / self.min_interval_s) + 2


def is_transient(err: BaseException) -> bool:
    """Whether trying again may help: not for sftflow's own clear errors (bad input, missing
    project, checksum mismatch), nor for a missing or forbidden object, nor for a request the
    server refused (4xx other than 408/429); yes for timeouts, dropped connections and 5xx."""
    if isinstance(err, SftflowError | FileNotFoundError | PermissionError | ValueError | TypeError):
        return False
    status = _http_status(err)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return True


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(code) if code else None
    status = getattr(err, "status_code", None)  # label_studio_sdk ApiError
    if isinstance(status, int):
        return status
    status = getattr(response, "status_code", None)  # httpx.HTTPStatusError
    return status if isinstance(status, int) else None


def wait_until(
    probe: Callable[[], T],
    *,
    timeout_s: float,
    backoff: Backoff | None = None,
    progressed: Callable[[T], bool] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``probe()`` until its result is truthy; the last (falsy) result at the deadline.
    ``progressed(result)`` resets the backoff to its minimum interval."""
    backoff = backoff or Backoff(0.5, 10.0)
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        remaining = deadline - time.monotonic()
        if result or remaining <= 0:
            return result
        sleep(min(remaining, backoff.next_delay(progressed(result) if progressed else False)))


def retry(
    fn: Callable[[], T],
    *,
    attempts: int,
    retry_if: Callable[[BaseException], bool] = is_transient,
    backoff: Backoff | None = None,
    timeout_s: float | None = None,
    on_retry: Callable[[BaseException, int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, again after an error that ``retry_if`` accepts, at most ``attempts`` times in
    all and not past ``timeout_s``; the last error is raised. ``on_retry(err, attempt)`` is
    called before each pause."""
    backoff = backoff or Backoff(0.5, 30.0)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            delay = backoff.next_delay()
            out_of_time = deadline is not None and time.monotonic() + delay > deadline
            if attempt == attempts or out_of_time or not retry_if(err):
                raise
            if on_retry:
                on_retry(err, attempt)
            sleep(delay)
    raise AssertionError("unreachable")  # attempts >= 1
