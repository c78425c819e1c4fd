"""The unattended paths fire on the stack's real Prefect server: schedules and event storage.

`sftflow serve` runs in a subprocess against the local stack's Prefect server (not the test
harness, whose ephemeral server runs no scheduler). The test waits for what a user relies on
when nobody is watching:

- the check deployment's interval schedule produces completed, auto-scheduled runs;
- a scheduled check that sees the threshold crossed starts a build, which commits a version;
- the catch-up ingest cron (every minute here) fires and imports the waiting prompt file;
- events emitted by the flows and by the webhook bridge are persisted by the server and can be
  read back from its events API.

A Prefect server whose scheduler or event persister fails (as with SQLAlchemy 2.1, issue #13)
fails every one of these.
"""

from __future__ import annotations

import contextvars
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from sftflow.tasks.ingest.projects import SFT_LABEL_CONFIG
from sftflow.tasks.runtime.polling import Backoff, wait_until
from tests.conftest import unique

# One worker runs the whole module: its `served` fixture (module scope) runs `sftflow serve`,
# which registers the deployments under their fixed names (check-annotations, build-dataset,
# ingest ...) on the stack's one Prefect server; a second copy on another xdist worker would
# re-register them with its own bucket and project.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("stack-prefect-serve")]

DATASET = "sched"
MIN_NEW = 2
CHECK_INTERVAL_S = 10
PROMPTS = [f"scheduled prompt number {i}: how does a {w} work?" for i, w in
           enumerate(["bridge", "clock", "kettle"])]


def _wait_for(what: str, probe: Callable[[], Any], timeout_s: float, log: Path) -> Any:
    """``probe()`` until it returns something truthy, polling every 0.5-2 s to a deadline."""
    value = wait_until(probe, timeout_s=timeout_s, backoff=Backoff(0.5, 2.0))
    if not value:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        pytest.fail(f"{what}: nothing after {timeout_s:.0f} s; serve log tail:\n{tail}")
    return value


class Api:
    """The stack's Prefect REST API, read the way the UI reads it."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url.rstrip("/") + "/", timeout=30)

    def deployment_id(self, flow: str, name: str) -> str | None:
        r = self.http.get(f"deployments/name/{flow}/{name}")
        return r.json()["id"] if r.status_code == 200 else None

    def delete_served_deployments(self) -> list[str]:
        """Delete the deployments `sftflow serve` registers, as an earlier run left them."""
        from sftflow.deployments.serve import BUILD, CHECK, DRAFTS, FINETUNE, INGEST

        r = self.http.post("deployments/filter", json={
            "deployments": {"name": {"any_": [INGEST, CHECK, BUILD, FINETUNE, DRAFTS]}}})
        r.raise_for_status()
        for d in r.json():
            self.http.delete(f"deployments/{d['id']}").raise_for_status()
        return [d["name"] for d in r.json()]

    def runs(self, deployment_id: str) -> list[dict]:
        r = self.http.post("flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployment_id]}}, "limit": 200})
        r.raise_for_status()
        return r.json()

    def events(self, prefix: str, resource_id: str, since: datetime) -> list[dict]:
        r = self.http.post("events/filter", json={"filter": {
            "occurred": {"since": since.isoformat()},
            "event": {"prefix": [prefix]},
            "resource": {"id": [resource_id]},
        }, "limit": 50})
        r.raise_for_status()
        return r.json()["events"]


def completed(runs: list[dict], auto_scheduled: bool | None = None, **params: str) -> list[dict]:
    """The completed runs among ``runs`` (of this test's parameters: the deployment names are
    shared with whatever else used the stack's server before)."""
    return [r for r in runs if r["state_type"] == "COMPLETED"
            and (auto_scheduled is None or r["auto_scheduled"] is auto_scheduled)
            and params.items() <= r["parameters"].get("params", {}).items()]


@pytest.fixture(scope="module")
def served(stack, tmp_path_factory) -> Iterator[dict]:
    """A fresh bucket with a waiting prompt file, a project with MIN_NEW annotated tasks, and
    ``sftflow serve`` for them on the stack's Prefect server, stopped (by pid) afterwards."""
    from sftflow.tasks.adapters.labelstudio import build_labelstudio
    from sftflow.tasks.adapters.s3 import build_s3

    settings = stack
    bucket = unique("t-sched")
    s3 = build_s3(settings.s3.model_copy(update={"bucket": bucket}))
    s3.ensure_bucket()
    s3.put_bytes("prompts/waiting.jsonl",
                 "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS).encode())
    ls = build_labelstudio(settings.labelstudio)
    project = ls.projects.create(title=unique("t-sched"), label_config=SFT_LABEL_CONFIG)
    task_ids = ls.projects.import_tasks(
        id=project.id, request=[{"prompt": f"already here {i}: why is the sky blue?"}
                                for i in range(MIN_NEW + 1)],
        return_task_ids=True).task_ids
    for i, task_id in enumerate(task_ids[:MIN_NEW]):
        ls.annotations.create(id=task_id, result=[{
            "from_name": "instruction", "to_name": "prompt", "type": "textarea",
            "value": {"text": [f"because of Rayleigh scattering, take {i}"]}}])

    api_url = settings.prefect.api_url
    # A `serve` of an earlier session on this server, stopped with a check run mid-submission,
    # leaves that run holding the check deployment's one slot (CANCEL_NEW) for good: every
    # scheduled run of this session would be cancelled. Its deployments start afresh.
    Api(api_url).delete_served_deployments()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": api_url, "SFTFLOW_S3__BUCKET": bucket}
    argv = [str(Path(sys.executable).parent / "sftflow"), "serve",
            "--source", f"s3://{bucket}/prompts/", "--project", project.title,
            "--dataset", DATASET, "--min-new", str(MIN_NEW),
            "--check-interval", str(CHECK_INTERVAL_S), "--ingest-cron", "* * * * *"]
    started = datetime.now(UTC) - timedelta(seconds=5)
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield {"api": Api(api_url), "project": project, "bucket": bucket, "s3": s3, "ls": ls,
               "log": log, "started": started, "settings": settings}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        ls.projects.delete(id=project.id)
        s3.delete(o.key for o in s3.list(""))
        s3.client.delete_bucket(Bucket=bucket)


def test_interval_schedule_produces_completed_scheduled_runs(served):
    api, log = served["api"], served["log"]
    check = _wait_for("check-annotations deployment registered",
                      lambda: api.deployment_id("check-annotations", "check-annotations"), 60, log)
    def two_completed() -> list[dict] | None:
        done = completed(api.runs(check), auto_scheduled=True,
                         project=served["project"].title)
        return done if len(done) >= 2 else None

    runs = _wait_for("two completed runs of the check-annotations schedule", two_completed,
                     150, log)
    assert all(r["auto_scheduled"] and r["deployment_id"] == check for r in runs)


def test_scheduled_check_starts_a_build_that_commits_a_version(served):
    api, log, s3 = served["api"], served["log"], served["s3"]
    build = _wait_for("build-dataset deployment registered",
                      lambda: api.deployment_id("build-dataset", "build-dataset"), 60, log)
    builds = _wait_for("a completed build started by the scheduled check",
                       lambda: completed(api.runs(build), project=str(served["project"].id)),
                       240, log)
    assert builds[0]["parameters"]["params"]["dataset"] == DATASET
    assert builds[0]["parameters"]["params"]["project"] == str(served["project"].id)
    assert s3.head(f"datasets/{DATASET}/refs/latest") is not None


def test_cron_ingest_fires_and_imports_the_waiting_file(served):
    api, log, ls = served["api"], served["log"], served["ls"]
    ingest = _wait_for("ingest deployment registered",
                       lambda: api.deployment_id("ingest-prompts", "ingest"), 60, log)
    runs = _wait_for("a completed run of the every-minute ingest cron",
                     lambda: completed(api.runs(ingest), True,
                                       source=f"s3://{served['bucket']}/prompts/"), 200, log)
    assert runs[0]["parameters"]["params"]["source"] == f"s3://{served['bucket']}/prompts/"
    texts = {t.data["prompt"] for t in ls.tasks.list(project=served["project"].id)}
    assert set(PROMPTS) <= texts


def test_flow_and_bridge_events_are_persisted_and_read_back(served):
    """The flows' own events (ingested, versioned) and one the bridge emits on an S3
    notification are stored by the event persister and returned by the events API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from sftflow.bridge import create_app
    from sftflow.core.events import DATASET_VERSIONED, PROMPTS_ARRIVED, PROMPTS_INGESTED
    from sftflow.tasks.triggers.webhooks import SECRET_HEADER

    api, log, since = served["api"], served["log"], served["started"]
    project_id = served["project"].id
    _wait_for("the ingest flow's event, persisted",
              lambda: api.events(PROMPTS_INGESTED, f"sftflow.labelstudio.project.{project_id}",
                                 since), 240, log)
    versioned = _wait_for("the build flow's event, persisted",
                          lambda: api.events(DATASET_VERSIONED, f"sftflow.dataset.{DATASET}",
                                             since), 240, log)
    assert versioned[0]["payload"]["dataset"] == DATASET and versioned[0]["occurred"]

    settings = served["settings"].with_bucket(served["bucket"])
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect.api_url}):
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0,
                                               log_level="warning"))
        thread = threading.Thread(target=contextvars.copy_context().run, args=(server.run,),
                                  daemon=True)
        thread.start()
        _wait_for("bridge started", lambda: server.started, 20, log)
        port = server.servers[0].sockets[0].getsockname()[1]
        key = f"prompts/{unique('late')}.jsonl"
        record = {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": served["bucket"]},
                  "object": {"key": key, "size": 10, "eTag": "abc"}}}
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/s3", json={"Records": [record]},
                           headers={SECRET_HEADER: settings.webhooks.secret.get_secret_value()})
            assert r.status_code == 200, r.text
        finally:
            server.should_exit = True
            thread.join(10)
    arrived = _wait_for("the bridge's event, persisted",
                        lambda: api.events(PROMPTS_ARRIVED, f"sftflow.s3.{served['bucket']}.{key}",
                                           since), 60, log)
    assert arrived[0]["payload"]["uri"] == f"s3://{served['bucket']}/{key}"
