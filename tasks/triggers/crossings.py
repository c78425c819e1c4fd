"""Build attempts per threshold crossing: one build run at a time, a new one after it ended.

A *crossing* is (project, dataset, baseline version, threshold). Its first build run carries
the crossing's idempotency key as it always did; attempt n > 1 carries ``<key>:attempt-<n>``.
Every attempt is tagged ``sftflow.crossing:<hash of the key>`` so the attempts can be found.

``next_attempt`` decides: while the latest attempt is still scheduled, pending or running it
is reused (no second concurrent build for one crossing); once it ended (failed, crashed,
cancelled, or completed without moving the baseline) the next attempt gets the next key. Two
checks racing on the same ended attempt compute the same next key, and Prefect returns the
one run for it.

``build_parameters`` gives the run its parameters: the build deployment's own, with every
setting the check was given over them (project, dataset, bucket). Prefect replaces a
deployment's parameter with the run's whole, so a setting left out here would be lost.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sftflow.core.hashing import config_hash
from sftflow.tasks.runtime.declare import io_task

#: Prefect state types of a run that has not ended (reuse it).
ACTIVE_STATES = frozenset({"SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"})
_ATTEMPT = re.compile(r":attempt-(\d+)$")


@dataclass(frozen=True)
class Attempt:
    key: str  # the idempotency key to create (or find) the run with
    number: int
    tag: str  # the crossing's tag, set on every attempt
    reuse_run_id: str | None = None  # an attempt that has not ended yet
    #: the build deployment's own parameters (its ``params``: project, dataset, bucket, ...)
    deployment_parameters: Mapping[str, Any] = field(default_factory=dict)


def crossing_tag(base_key: str) -> str:
    return f"sftflow.crossing:{config_hash(base_key)}"


def attempt_number(base_key: str, idempotency_key: str | None) -> int:
    """1 for the crossing's own key, n for ``<key>:attempt-<n>``, 0 for another key."""
    if idempotency_key == base_key:
        return 1
    m = _ATTEMPT.search(idempotency_key or "")
    if m and idempotency_key == f"{base_key}:attempt-{m.group(1)}":
        return int(m.group(1))
    return 0


def next_attempt(base_key: str, runs: Iterable[tuple[str, str | None, str | None]]) -> Attempt:
    """The attempt to start for a crossing, from its known runs ``(run id, idempotency key,
    state type)``: the latest one while it is active, else the one after it."""
    latest: tuple[int, str, str | None] | None = None
    for run_id, key, state in runs:
        n = attempt_number(base_key, key)
        if n and (latest is None or n > latest[0]):
            latest = (n, run_id, state)
    tag = crossing_tag(base_key)
    if latest is None:
        return Attempt(base_key, 1, tag)
    n, run_id, state = latest
    if state in ACTIVE_STATES:
        return Attempt(base_key if n == 1 else f"{base_key}:attempt-{n}", n, tag, run_id)
    return Attempt(f"{base_key}:attempt-{n + 1}", n + 1, tag)


def build_parameters(deployment_parameters: Mapping[str, Any] | None,
                     settings: Mapping[str, Any]) -> dict[str, Any]:
    """The build run's parameters: the deployment's ``params`` with each of ``settings`` (what
    the check was given: project, dataset, bucket) over them; a setting that is None keeps the
    deployment's value."""
    base = dict(deployment_parameters or {})
    params = dict(base.get("params") or {})
    params.update({k: v for k, v in settings.items() if v is not None})
    return {**base, "params": params}


def find_attempt(deployment: str, base_key: str) -> Attempt:
    """``next_attempt`` over the runs of ``deployment`` ('<flow>/<deployment>') for this
    crossing, read from the current Prefect API, with the deployment's own parameters."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterIdempotencyKey,
        FlowRunFilterTags,
    )

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        of_dep = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        runs = {}
        for flt in (FlowRunFilter(tags=FlowRunFilterTags(all_=[crossing_tag(base_key)])),
                    FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[base_key]))):
            for r in client.read_flow_runs(flow_run_filter=flt, deployment_filter=of_dep):
                runs[r.id] = (str(r.id), r.idempotency_key,
                              r.state.type.value if r.state else None)
    return replace(next_attempt(base_key, runs.values()),
                   deployment_parameters=dict(dep.parameters or {}))


find_attempt_task = io_task(name="find-build-attempt")(find_attempt)
