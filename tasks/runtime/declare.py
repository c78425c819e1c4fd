"""The one way to declare a Prefect task: a plain function, wrapped by one of two aliases.

- ``io_task`` for I/O: 4 retries, 2 s, 4 s, 8 s, 16 s, each +-50 % jitter, and only when
  ``is_transient`` says the error may heal (never an ``SftflowError``). A variant passes its
  own ``retry_condition_fn``.
- ``compute_task`` for pure computation: no retries (a bug does not get better by running again).

Tasks take service clients as arguments, which cannot be hashed into cache keys, so caching is
off (``NO_CACHE``); idempotency comes from ledgers, content ids and conditional writes instead.
The plain function stays callable as ``task.fn`` and is what the unit tests call.

Importing this module also makes the flow runs of this process end as soon as their work does
(``heartbeat.install``: Prefect's heartbeat thread otherwise holds each run up to 1 s).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from sftflow.tasks.runtime import heartbeat
from sftflow.tasks.runtime.polling import is_transient

heartbeat.install()


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn`` form of ``is_transient``."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - classify, don't handle
        return is_transient(err)
    return False


io_task = partial(
    task,
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)

compute_task = partial(task, cache_policy=NO_CACHE)


def artifact_key(*parts: object) -> str:
    """A Prefect artifact key from parts: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")
