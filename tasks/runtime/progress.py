"""How a long run reports where it is: seconds per named phase, and a throttled progress bar.

- ``PhaseTimer``: ``with timer.phase("read"): ...`` adds the block's wall time to that phase,
  and ``timer.lap("read")`` the time since the previous lap (a flow's stages one after the
  other); ``seconds()`` is the total per phase, rounded to milliseconds, for a run's report.
- ``ProgressBar``: a Prefect progress artifact, updated at most once per interval (and always on
  the last item) so a run over many small items does not flood the API.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator

from prefect.artifacts import create_progress_artifact, update_progress_artifact


class PhaseTimer:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._started = self._last_lap = clock()
        self._seconds: Counter[str] = Counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = self._clock()
        try:
            yield
        finally:
            self._seconds[name] += self._clock() - started

    def lap(self, name: str) -> None:
        """Add the time since the previous lap (or since the timer was made) to ``name``."""
        now = self._clock()
        self._seconds[name] += now - self._last_lap
        self._last_lap = now

    def seconds(self) -> dict[str, float]:
        return {name: round(s, 3) for name, s in self._seconds.items()}

    def elapsed(self) -> float:
        """Seconds since the timer was made."""
        return self._clock() - self._started


class ProgressBar:
    """Progress over ``total`` items as a Prefect artifact (none when there is nothing to do)."""

    def __init__(self, total: int, key: str, description: str, *, min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self._min_interval_s, self._clock = total, min_interval_s, clock
        self._id = (create_progress_artifact(progress=0.0, key=key, description=description)
                    if total else None)
        self._shown = clock()

    def update(self, done: int) -> None:
        """``done`` of ``total`` items are finished."""
        if self._id is None:
            return
        if done == self.total or self._clock() - self._shown > self._min_interval_s:
            update_progress_artifact(self._id, progress=100.0 * done / self.total)
            self._shown = self._clock()
