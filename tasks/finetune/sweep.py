"""The fine-tune trigger's reconciliation: an announced version that no fine-tune took up.

The ``finetune`` deployment starts on the ``sftflow.dataset.versioned`` event. A trigger
missed (the server restarted between accepting the event and acting on it, the deployment
was not registered then, the run it created was lost) means nothing else would start the
version's fine-tune. The scheduled check (``flows/check_annotations.py``) asks
:func:`version_to_finetune` and, for the version it names, :func:`start_finetune`:

- only ``refs/latest``, only once it is announced (``refs/announced/<version>``, written when
  the server accepted the event), and only ``grace_s`` after that (the trigger's turn first);
- not when a lineage record names the version (``tasks/finetune/lineage.py``: a job of it was
  claimed or submitted, whatever its outcome);
- not while a run of the deployment for ``<dataset>@<version>`` is scheduled, pending or
  running, nor once one completed;
- else one run, with the idempotency key ``finetune:<dataset>@<version>:reconcile``: racing
  checks and later checks find that same run (Prefect creates one per key), so a version whose
  fine-tune fails (its gates) is retried once by reconciliation, never in a loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.finetune import lineage
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.versions import refs
from sftflow.tasks.versions.keys import DatasetKeys

#: Prefect state types of a run that still holds the version's fine-tune, or completed it.
TAKEN_STATES = frozenset({"SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING",
                          "COMPLETED"})
#: How many of the deployment's latest runs are compared (newest first).
RUNS_READ = 200


@dataclass(frozen=True)
class FinetuneStart:
    """What the reconciliation did for one version."""

    version: str
    flow_run_id: str | None  # the run that fine-tunes it (started now, or found)
    started: bool  # True: this call created the run
    reason: str


def reconcile_key(dataset: str, version: str) -> str:
    return f"finetune:{dataset}@{version}:reconcile"


def version_to_finetune(s3: S3, dataset: str, *, datasets_prefix: str, models_prefix: str,
                        grace_s: float, now: datetime | None = None) -> str | None:
    """``refs/latest`` when it was announced more than ``grace_s`` ago and no lineage record
    names it; None otherwise."""
    latest = refs.latest_version(s3, dataset, prefix=datasets_prefix)
    if latest is None:
        return None
    marker = s3.head(DatasetKeys.of(datasets_prefix, dataset).announced(latest))
    if marker is None:
        return None  # not announced yet: announcing it is the trigger's path
    now = now or datetime.now(UTC)
    if marker.last_modified and now - marker.last_modified < timedelta(seconds=grace_s):
        return None  # the trigger has not had its turn yet
    if any(r.version == latest for r in lineage.list_records(s3, models_prefix, dataset)):
        return None
    return latest


def _runs_for(client: Any, deployment_id: Any, target: str) -> list[tuple[str, str | None]]:
    """(run id, state type) of the deployment's latest runs whose ``params.dataset`` is
    ``target``."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=RUNS_READ)
    out = []
    for r in runs:
        params = (r.parameters or {}).get("params") or {}
        if isinstance(params, Mapping) and params.get("dataset") == target:
            out.append((str(r.id), r.state.type.value if r.state else None))
    return out


def start_finetune(deployment: str, dataset: str, version: str,
                   settings: Mapping[str, Any] | None = None) -> FinetuneStart:
    """Start the fine-tune of ``dataset@version`` on ``deployment`` ('<flow>/<deployment>')
    unless a run of it is in flight or completed; ``settings`` (bucket, ...) go over the
    deployment's own ``params``. Uses the Prefect API of the current settings."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    target = f"{dataset}@{version}"
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            return FinetuneStart(version, None, False, f"no deployment {deployment!r}")
        runs = _runs_for(client, dep.id, target)
    taken = [(run_id, state) for run_id, state in runs if state in TAKEN_STATES]
    if taken:
        run_id, state = taken[0]
        return FinetuneStart(version, run_id, False, f"run {run_id} is {state}")
    base = dict(dep.parameters or {})
    params = {**dict(base.get("params") or {}), "dataset": target,
              **{k: v for k, v in (settings or {}).items() if v is not None}}
    run = run_deployment(deployment, parameters={**base, "params": params},
                         idempotency_key=reconcile_key(dataset, version), timeout=0,
                         tags=["sftflow.reconcile"])
    started = not any(run_id == str(run.id) for run_id, _ in runs)
    return FinetuneStart(version, str(run.id), started,
                         "started: announced, no fine-tune" if started
                         else f"reconciliation run {run.id} already ended")


version_to_finetune_task = io_task(name="version-to-finetune")(version_to_finetune)
start_finetune_task = io_task(name="start-finetune")(start_finetune)
