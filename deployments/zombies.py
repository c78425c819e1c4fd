"""Zombie runs: a flow run whose process died (``kill -9``, OOM, a lost machine) is marked
CRASHED instead of staying RUNNING forever (its concurrency slot held, its crossing never
built again).

Prefect's supported way (https://docs.prefect.io/v3/advanced/detect-zombie-flows): the flow
processes emit ``prefect.flow-run.heartbeat`` events every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``
seconds (``settings.prefect.heartbeat_s``, :func:`heartbeat_env`), and a proactive automation
expects another heartbeat, or a terminal state, of the same run within ``3 x`` that after each
heartbeat; when none comes it sets the run CRASHED. Scoped to runs tagged ``sftflow`` (every
sftflow deployment carries the tag), so another project's runs on the same server, whose
heartbeats may be slower, are never crashed by it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

#: The automation's name: :func:`ensure_zombie_automation` keeps exactly one with it.
ZOMBIE_AUTOMATION = "sftflow: crash zombie flow runs"
#: Heartbeats a run may miss before it counts as dead (``within`` = this x the frequency).
MISSED_HEARTBEATS = 3
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
#: A heartbeat or one of these ends the wait: a run that finished is never crashed.
_ENDED = ("Completed", "Failed", "Cancelled", "Crashed", "TimedOut", "Suspended")


def heartbeat_env(heartbeat_s: int | None = None) -> dict[str, str]:
    """The environment of a flow process that makes it emit heartbeats every ``heartbeat_s``
    (default: ``settings.prefect.heartbeat_s``)."""
    if heartbeat_s is None:
        from sftflow.core.settings import get_settings

        heartbeat_s = get_settings().prefect.heartbeat_s
    return {HEARTBEAT_ENV: str(int(heartbeat_s))}


def zombie_automation(heartbeat_s: int, within_s: float | None = None) -> Any:
    """The automation (``AutomationCore``): no heartbeat or end of an ``sftflow``-tagged flow
    run within ``within_s`` (default ``MISSED_HEARTBEATS x heartbeat_s``; Prefect's minimum
    is 10 s) after one of its heartbeats -> the run is set CRASHED."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    within = timedelta(seconds=within_s if within_s is not None
                       else MISSED_HEARTBEATS * heartbeat_s)
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=f"An sftflow flow run with no heartbeat for {within.total_seconds():.0f} s "
                    f"(its process died; heartbeats every {heartbeat_s} s) is marked Crashed.",
        enabled=True,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in _ENDED)},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag",
                           "prefect.resource.id": "prefect.tag.sftflow"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=within,
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {within.total_seconds():.0f} s: the flow process died.",
        )],
    )


def ensure_zombie_automation(heartbeat_s: int | None = None,
                             within_s: float | None = None) -> UUID:
    """Create the zombie automation on the current Prefect API, or bring the one of that name
    up to date (idempotent: one automation, whatever the number of calls); its id."""
    from prefect.client.orchestration import get_client

    if heartbeat_s is None:
        heartbeat_s = int(heartbeat_env()[HEARTBEAT_ENV])
    wanted = zombie_automation(heartbeat_s, within_s)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        for extra in existing[1:]:
            client.delete_automation(extra.id)
        if not existing:
            return client.create_automation(wanted)
        keep = existing[0]
        fields = set(type(wanted).model_fields)
        if keep.model_dump(include=fields, mode="json") != wanted.model_dump(mode="json"):
            client.update_automation(keep.id, wanted)
        return keep.id
