"""Issue #18 item 3: a version counts as announced (``refs/announced/<version>``) only once the
Prefect server has accepted its ``dataset.versioned`` event, readable from its API.

A FaultProxy sits in front of the real Prefect API (the test harness's server): the HTTP API
passes through, the events endpoint (``/api/events/in``, the websocket) is refused. The
version must then stay unannounced, so that a rerun or the scheduled reconciliation announces
it once the server is reachable again.
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlparse

import pytest

from sftflow.core import events
from sftflow.tasks.adapters.prefect import event_stored
from sftflow.tasks.build.publish import announce, publish_version
from sftflow.tasks.build.report import BuildReport
from sftflow.tasks.versions.keys import DatasetKeys
from sftflow.tasks.versions.refs import versioned_event_id
from tests.conftest import unique
from tests.faults.proxy import Fault, FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

PREFIX = "datasets"


def _report(dataset: str) -> BuildReport:
    version = "v-" + unique("x")[2:]
    return BuildReport(dataset=dataset, version=version, created=True, ref_updated=True,
                       latest=version, project_id=7, rows={"train": 3, "eval": 1})


def _stored(dataset: str, version: str) -> bool:
    """Read from the harness's API directly (not through the proxy)."""
    return event_stored(versioned_event_id(dataset, version),
                        events.dataset_resource(dataset)["prefect.resource.id"])


@contextlib.contextmanager
def proxied_api():
    """A FaultProxy in front of the harness's Prefect API, and Prefect pointed at it. (The
    proxy forwards HTTP only: a websocket through it never works, so the healthy path is
    tested against the server directly.)"""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = urlparse(PREFECT_API_URL.value())
    with FaultProxy(api.hostname, api.port) as proxy, \
            temporary_settings(updates={PREFECT_API_URL: f"{proxy.url}{api.path}"}):
        yield proxy


def test_a_version_whose_event_the_server_never_got_is_not_announced(prefect_harness, s3):
    dataset = unique("ann")
    report = _report(dataset)
    with proxied_api() as proxy:
        proxy.add(Fault("status", path=r"/events/in", times=0, status=503))
        announced = publish_version(s3, PREFIX, report, [], confirm_s=5)
        assert proxy.applied["status"] >= 1  # the events endpoint was tried, and refused

    marker = s3.head(DatasetKeys.of(PREFIX, dataset).announced(report.version))
    stored = _stored(dataset, report.version)
    assert marker is None or stored, (
        f"refs/announced/{report.version} written though the server never got the event")
    assert not announced and marker is None and not stored

    # the server is reachable again: the reconciliation's announce delivers it, then marks it
    assert announce(s3, PREFIX, dataset, report.version, {"dataset": dataset,
                                                         "version": report.version})
    assert s3.head(DatasetKeys.of(PREFIX, dataset).announced(report.version)) is not None
    assert _stored(dataset, report.version)


def test_a_version_is_marked_announced_only_once_its_event_is_readable(prefect_harness, s3):
    dataset = unique("ann")
    report = _report(dataset)

    assert publish_version(s3, PREFIX, report, [])

    # at the moment it is marked, the server already has the event (no waiting here)
    assert s3.head(DatasetKeys.of(PREFIX, dataset).announced(report.version)) is not None
    assert _stored(dataset, report.version)
    assert not publish_version(s3, PREFIX, report, [])  # announced: a rebuild stays quiet
