"""The Prefect server probes: its services' errors in its log, and scheduled deployments
without upcoming runs (a server whose scheduler is not working)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest

from sftflow.tasks.adapters.prefect import service_errors, unscheduled_deployments
from sftflow.tasks.runtime.polling import Backoff, wait_until

#: The Prefect 3.8.8 server's log with SQLAlchemy 2.1.9 (issue #13), as the stack captured it.
FAILING_LOG = (Path(__file__).parents[1] / "data" / "prefect-scheduler-failing.log").read_text()


def test_service_errors_name_each_failing_service_with_its_exception():
    now = datetime(2026, 11, 24, 7, 5, 0)
    found = {e.service: e for e in service_errors(FAILING_LOG, now, timedelta(minutes=10))}
    assert set(found) == {"schedule_deployments", "schedule_recent_deployments"}
    assert found["schedule_deployments"].count == 1
    assert found["schedule_deployments"].last_at == "06:59:58"
    assert found["schedule_deployments"].message.startswith(
        "sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement")
    assert "schedule_deployments failing (1x, last at 06:59:58)" in found[
        "schedule_deployments"].describe()


def test_service_errors_outside_the_window_are_history():
    assert service_errors(FAILING_LOG, datetime(2026, 11, 24, 7, 30), timedelta(minutes=10)) == []
    # The log has no dates: just after midnight, 23:59 is a minute ago.
    late = "23:59:30.000 | ERROR   | prefect.server.services.x - boom\n"
    assert [e.service for e in service_errors(late, datetime(2026, 11, 25, 0, 1),
                                              timedelta(minutes=10))] == ["prefect.server.services.x"]


def _scheduled_deployment(name: str) -> str:
    from prefect import flow

    @flow(name="orchestrator-probe")
    def probe() -> None:
        """A flow that is never run, only scheduled."""

    return str(probe.to_deployment(name=name, interval=timedelta(hours=1)).apply())


@pytest.mark.prefect
def test_a_server_without_a_scheduler_is_found_out(prefect_harness):
    """The test harness's server runs no scheduler: a scheduled deployment gets no runs."""
    _scheduled_deployment("unscheduled")
    assert "orchestrator-probe/unscheduled" in unscheduled_deployments(grace=timedelta(0))
    assert "orchestrator-probe/unscheduled" not in unscheduled_deployments()  # still in grace


@pytest.mark.integration
def test_a_working_scheduler_passes(stack):
    """The stack's server schedules a new deployment's runs within seconds."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.prefect.api_url}):
        _scheduled_deployment("scheduled")
        assert wait_until(
            lambda: "orchestrator-probe/scheduled" not in unscheduled_deployments(grace=timedelta(0)),
            timeout_s=60, backoff=Backoff(0.5, 2.0)), "the stack's scheduler made no run in 60 s"
