"""Is the Prefect server doing its unattended work, not merely answering ``/api/health``?

A server whose scheduler or event persister fails still answers health checks (issue #13:
SQLAlchemy 2.1 broke both while ``/api/health`` said yes). Two probes tell:

- ``service_errors``: the server's own log (the local stack keeps one) holds ERROR records of
  its background services (scheduler, event persister, ...): each loop that fails logs one.
- ``unscheduled_deployments``: through the API, for any server: a deployment with an active
  schedule that has no upcoming run means the scheduler is not creating runs.

And delivering an event the server has *accepted*, not merely queued: ``send_event`` emits
through an awaited events client (the websocket, then a ping the server answers only after
the event), raising when it cannot; ``event_stored`` reads it back from the API by id and
resource (``/events/filter``), which is what the caller waits on before recording it as sent.
(``prefect.events.emit_event`` only queues into a background worker: an event lost there is
lost silently.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from uuid import UUID

#: ``07:00:58.143 | ERROR   | docket.dependencies - ↩ [ 33ms] schedule_deployments(){...}``
_RECORD = re.compile(r"^(\d\d:\d\d:\d\d)(?:\.\d+)? \| (\w+)\s*\| (\S+) - (.*)$")
_DOCKET_CALL = re.compile(r"(\w+)\(")
_EXCEPTION = re.compile(r"^[\w.]+(Error|Exception|Exit)\b.*")


@dataclass(frozen=True)
class ServiceError:
    """One service's failures in the window: how many, when last, and the last exception."""

    service: str
    count: int
    last_at: str
    message: str

    def describe(self) -> str:
        return f"{self.service} failing ({self.count}x, last at {self.last_at}): {self.message}"


def _service_name(logger: str, text: str) -> str:
    if logger.startswith("docket"):  # services run as docket tasks: name the function
        call = _DOCKET_CALL.search(text.split("]", 1)[-1])
        if call:
            return call.group(1)
    return logger


def _age(at: time, now: datetime) -> timedelta:
    """How long ago a time of day was (the log has no dates; one day wraps around)."""
    then = now.replace(hour=at.hour, minute=at.minute, second=at.second, microsecond=0)
    return (now - then) % timedelta(days=1)


def service_errors(log_text: str, now: datetime, window: timedelta) -> list[ServiceError]:
    """ERROR records of the server's services within ``window`` of ``now`` (local time, as the
    server writes it), one entry per service, with the exception line that followed."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: str | None = None
    for line in log_text.splitlines():
        record = _RECORD.match(line)
        if record:
            current = None
            stamp, level, logger, text = record.groups()
            if level == "ERROR" and _age(time.fromisoformat(stamp), now) <= window:
                current = _service_name(logger, text)
                found.setdefault(current, []).append((stamp, text.strip()))
        elif current and _EXCEPTION.match(line):
            stamp, _ = found[current][-1]
            found[current][-1] = (stamp, line.strip())
    return [ServiceError(name, len(hits), hits[-1][0], hits[-1][1][:300])
            for name, hits in sorted(found.items())]


def unscheduled_deployments(grace: timedelta = timedelta(minutes=2)) -> list[str]:
    """Deployments (``flow/deployment``) with an active schedule, updated more than ``grace``
    ago, that have no upcoming scheduled run: the scheduler is not creating their runs.
    Uses the Prefect API of the current settings."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    upcoming = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING])))
    stale: list[str] = []
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        for dep in client.read_deployments():
            active = [s for s in dep.schedules if s.active]
            if dep.paused or not active or dep.updated is None:
                continue
            if datetime.now(dep.updated.tzinfo) - dep.updated < grace:
                continue  # the scheduler has not had its turn yet
            runs = client.read_flow_runs(
                flow_run_filter=upcoming,
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                limit=1,
            )
            if not runs:
                stale.append(f"{flows.get(dep.flow_id, '?')}/{dep.name}")
    return stale


def send_event(name: str, resource: dict[str, str], payload: dict[str, Any], event_id: UUID,
               *, attempts: int = 2) -> None:
    """Emit one event to the Prefect API of the current settings and wait for the server to
    have received it (a websocket ping answered after the send). Raises when it could not be
    sent (no API URL and no ephemeral server, the events endpoint refused or unreachable
    after ``attempts`` tries)."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    event = Event(event=name, resource=resource, payload=payload, id=event_id)

    async def send() -> None:
        # checkpoint_every=1: every emit pings and awaits the pong, so a return means received
        async with get_events_client(reconnection_attempts=max(attempts - 1, 0),
                                     checkpoint_every=1) as client:
            await client.emit(event)

    run_coro_as_sync(send())


def event_stored(event_id: UUID, resource_id: str, *, since: datetime | None = None) -> bool:
    """Whether the Prefect API returns the event ``event_id`` of ``resource_id`` (the server
    persisted it). False when the API cannot be read now (ask again later)."""
    from prefect import get_client
    from prefect.events.filters import (
        EventFilter,
        EventIDFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    now = datetime.now(UTC)
    flt = EventFilter(
        id=EventIDFilter(id=[event_id]),
        resource=EventResourceFilter(id=[resource_id]),
        occurred=EventOccurredFilter(since=since or now - timedelta(days=30),
                                     until=now + timedelta(days=1)),
    )
    try:
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=flt, limit=1)
    except Exception:  # noqa: BLE001 - unreachable or refusing: not confirmed (yet)
        return False
    return any(e.id == event_id for e in page.events)
