"""Task decorators shared by ``tasks/``: retries with exponential backoff and jitter on I/O only.

Tasks take service clients as arguments, which cannot be hashed into cache keys, so caching is
off (``NO_CACHE``); idempotency comes from ledgers, content ids and conditional writes instead.
"""

from __future__ import annotations

from functools import partial

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

#: For tasks that talk to a service: 4 retries, 2 s, 4 s, 8 s, 16 s, each +-50 % jitter.
io_task = partial(
    task,
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    cache_policy=NO_CACHE,
)

#: For pure computation: no retries (a bug does not get better by running again).
compute_task = partial(task, cache_policy=NO_CACHE)
