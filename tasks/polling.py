"""A bounded polling schedule: exponential backoff with jitter between two intervals.

Every delay lies in ``[min_interval_s, max_interval_s]`` (except the last one, cut short at
the deadline), so a wait of T seconds polls at most ``T / min_interval_s + 2`` times: that is
the API-call budget of ``wait_for_annotations``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


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

    def next_delay(self, progressed: bool) -> float:
        """The pause before the next poll. Progress resets the interval to the minimum."""
        if progressed:
            self._interval = self.min_interval_s
        delay = self._interval * (1 + self.rng.uniform(-self.jitter, self.jitter))
        self._interval = min(self.max_interval_s, self._interval * self.factor)
        return min(self.max_interval_s, max(self.min_interval_s, delay))

    def max_polls(self, timeout_s: float) -> int:
        """An upper bound on polls within ``timeout_s`` (the first poll is immediate)."""
        return math.floor(timeout_s / self.min_interval_s) + 2
