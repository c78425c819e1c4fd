"""Named, cluster-wide mutual exclusion through Prefect global concurrency limits.

``global_lock("sftflow-build-dataset-d")`` holds the single slot of a limit of that name
(created with limit 1 on first use) so that two runs anywhere never hold it at once. A crashed
holder's lease expires after ``lease_s`` (the server's minimum is 60 s).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def global_lock(name: str, timeout_s: float, lease_s: float = 60) -> Iterator[None]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it just now
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=lease_s, strict=True):
        yield


def build_lock_name(dataset: str) -> str:
    return f"sftflow-build-dataset-{dataset}"


def ingest_lock_name(project_id: int) -> str:
    return f"sftflow-ingest-project-{project_id}"
