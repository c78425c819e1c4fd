"""Events -> deployment runs, end to end: real Label Studio webhooks through the bridge into a
real Prefect API (test harness, whose server runs triggers), with the project's deployments.

The flow runs the triggers create are counted, not executed (no runner polls the harness):
what is under test is which runs exist and with which parameters.
"""

from __future__ import annotations

import contextvars
import threading
import time

import httpx
import pytest
import uvicorn

from sftflow.deployments.serve import BUILD, INGEST, ServeConfig, build_deployments
from sftflow.flows.check_annotations import CheckParams, check_annotations
from sftflow.tasks.ingest.projects import SFT_LABEL_CONFIG
from sftflow.tasks.runtime.polling import Backoff, wait_until
from sftflow.tasks.triggers.webhooks import (
    SECRET_HEADER,
    ThresholdQuery,
    register_webhook,
    webhook_url,
)
from tests.conftest import unique

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

DATASET = "d"
MIN_NEW = 2


@pytest.fixture()
def bridge(prefect_harness, settings, s3):
    """The real bridge app on a loopback port, emitting to the harness, baseline from `s3`."""
    from sftflow.bridge import create_app

    cfg = settings.model_copy(update={"s3": settings.s3.model_copy(update={"bucket": s3.bucket})})
    # Port 0: the kernel's choice, read back once listening (no window for another process).
    # These tests are about what a crossing starts, not about a slow Label Studio (the bridge's
    # own tests cover its 0.5 s limit): under a loaded CI machine Label Studio on PostgreSQL
    # answered the counters past 0.5 s and no crossing was emitted (seen twice), so 10 s here.
    server = uvicorn.Server(uvicorn.Config(create_app(cfg, verify_timeout_s=10.0), host="127.0.0.1",
                                           port=0, log_level="warning"))
    ctx = contextvars.copy_context()  # carries the harness's PREFECT_API_URL into the thread
    thread = threading.Thread(target=ctx.run, args=(server.run,), daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, timeout_s=20, backoff=Backoff(0.05, 0.2))
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", cfg.webhooks.secret.get_secret_value()
    server.should_exit = True
    thread.join(10)


@pytest.fixture()
def deploy(prefect_harness, s3):
    """Apply the deployments configured for ``project`` (id or title); their ids by name."""

    def apply(project: str = "unused") -> dict:
        cfg = ServeConfig(source=f"s3://{s3.bucket}/prompts/", project=project, dataset=DATASET,
                          min_new=MIN_NEW, bucket=s3.bucket, debounce_s=600)
        ids = {d.name: d.apply() for d in build_deployments(cfg)}
        triggers_loaded()
        return ids

    return apply


def triggers_loaded(timeout_s: float = 60) -> None:
    """Return once the harness's trigger service has loaded every automation written so far
    (the triggers of the deployments just applied): it loads them in the order they were
    written, so a probe automation written last, which pauses itself when its own event
    arrives, shows it by being paused."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.actions import PauseAutomation
    from prefect.events.schemas.automations import EventTrigger, Posture

    name = unique("sftflow.test.triggers-loaded")
    probe = Automation(name=name, trigger=EventTrigger(expect={name}, posture=Posture.Reactive,
                                                       threshold=1),
                       actions=[PauseAutomation(source="inferred")]).create()  # pauses itself
    emitted = [0.0]

    def paused() -> bool:
        if time.monotonic() - emitted[0] >= 1:  # again each second: one may precede the load
            emit_event(event=name, resource={"prefect.resource.id": f"prefect.automation.{probe.id}"})
            emitted[0] = time.monotonic()
        with get_client(sync_client=True) as client:
            return not client.read_automation(probe.id).enabled

    try:
        assert wait_until(paused, timeout_s=timeout_s, backoff=Backoff(0.2, 0.5)), \
            f"the trigger service did not act on a new automation within {timeout_s:.0f} s"
    finally:
        probe.delete()


def runs_of(deployment_id, match: dict, settle_s: float = 4.0, timeout_s: float = 30.0,
            want: int = 1):
    """Flow runs of a deployment whose ``params`` include ``match``, once their number has
    stopped changing for ``settle_s`` (the harness is shared by the tests of the session)."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    flt = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    with get_client(sync_client=True) as client:
        deadline, seen, stable_since = time.monotonic() + timeout_s, None, time.monotonic()
        while time.monotonic() < deadline:
            runs = [r for r in client.read_flow_runs(deployment_filter=flt)
                    if match.items() <= r.parameters.get("params", {}).items()]
            if seen is None or len(runs) != len(seen):
                seen, stable_since = runs, time.monotonic()
            elif len(runs) >= want and time.monotonic() - stable_since >= settle_s:
                break
            time.sleep(0.5)  # a poll loop's pause: until the count has settled, or the deadline
        return seen


def annotate(client, task_id: int) -> None:
    client.annotations.create(id=task_id, result=[{
        "from_name": "instruction", "to_name": "prompt", "type": "textarea",
        "value": {"text": ["a response"]}}])


@pytest.fixture()
def projects(labelstudio):
    made = []

    def make():
        p = labelstudio.projects.create(title=unique("t-trig"), label_config=SFT_LABEL_CONFIG)
        made.append(p.id)
        ids = labelstudio.projects.import_tasks(
            id=p.id, request=[{"prompt": f"q {i}"} for i in range(4)], return_task_ids=True
        ).task_ids
        return p, ids

    yield make
    for pid in made:
        labelstudio.projects.delete(id=pid)


def project_payload(settings, project_id: int) -> dict:
    """What Label Studio puts in a webhook's ``project`` (same serializer fields as the API)."""
    resp = httpx.get(f"{settings.labelstudio.url}/api/projects/{project_id}",
                     headers={"Authorization": f"Token {settings.labelstudio.api_key.get_secret_value()}"})
    resp.raise_for_status()
    return resp.json()


def test_signed_webhooks_crossing_the_threshold_make_exactly_one_build(
    settings, labelstudio, bridge, deploy, projects
):
    url, secret = bridge
    p, task_ids = projects()
    deployments = deploy(str(p.id))
    hook = register_webhook(labelstudio, p.id,
                            webhook_url(f"{url}/labelstudio", ThresholdQuery(MIN_NEW, DATASET)),
                            secret)
    assert hook["created"] and SECRET_HEADER not in str(hook)
    again = register_webhook(labelstudio, p.id, webhook_url(f"{url}/labelstudio",
                             ThresholdQuery(MIN_NEW, DATASET)), secret)
    assert again == {**hook, "created": False}  # idempotent: one webhook, updated in place

    for task_id in task_ids[:3]:  # Label Studio itself calls the bridge: below, reached, reached
        annotate(labelstudio, task_id)
    health = httpx.get(f"{url}/health").json()["counts"]
    assert health["emitted"] == 3 and health.get("unauthorized", 0) == 0

    body = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1},
            "project": project_payload(settings, p.id)}
    for _ in range(20):  # the same webhook again, 20 times
        r = httpx.post(f"{url}/labelstudio?min_new={MIN_NEW}&dataset={DATASET}", json=body,
                       headers={SECRET_HEADER: secret})
        assert r.status_code == 200

    runs = runs_of(deployments[BUILD], {"project": str(p.id)})
    assert len(runs) == 1 and runs[0].parameters["params"]["dataset"] == DATASET


def test_unsigned_webhooks_make_no_build(settings, labelstudio, bridge, deploy, projects):
    url, _ = bridge
    p, task_ids = projects()
    deployments = deploy(str(p.id))
    for task_id in task_ids[:MIN_NEW]:
        annotate(labelstudio, task_id)  # no webhook registered: we post the crossing ourselves
    body = {"action": "ANNOTATION_CREATED", "project": project_payload(settings, p.id)}
    query = f"min_new={MIN_NEW}&dataset={DATASET}"
    for headers in ({}, {SECRET_HEADER: "wrong"}):
        r = httpx.post(f"{url}/labelstudio?{query}", json=body, headers=headers)
        assert r.status_code == 401
    assert httpx.get(f"{url}/health").json()["counts"].get("emitted", 0) == 0
    assert runs_of(deployments[BUILD], {"project": str(p.id)}, settle_s=3, timeout_s=6, want=0) == []


def test_s3_notification_starts_an_ingest_run(bridge, deploy, s3):
    url, secret = bridge
    deployments = deploy()
    record = {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": s3.bucket},
              "object": {"key": "prompts/batch-1.jsonl", "size": 10, "eTag": "abc"}}}
    elsewhere = {**record, "s3": {**record["s3"], "object": {"key": "datasets/x.parquet"}}}
    r = httpx.post(f"{url}/s3", json={"Records": [record, elsewhere]},
                   headers={SECRET_HEADER: secret})
    assert r.status_code == 200 and len(r.json()["emitted"]) == 2
    # The object outside the source prefix does not match the trigger: one run, not two.
    assert len(runs_of(deployments[INGEST], {})) == 1
    runs = runs_of(deployments[INGEST], {"source": f"s3://{s3.bucket}/prompts/batch-1.jsonl"})
    assert len(runs) == 1


def test_scheduled_check_starts_one_build_per_threshold_crossing(
    labelstudio, deploy, projects, s3
):
    p, task_ids = projects()
    deployments = deploy()
    params = CheckParams(project=p.title, dataset=DATASET, min_new=MIN_NEW, bucket=s3.bucket)
    assert not check_annotations(params).reached
    for task_id in task_ids[:MIN_NEW]:
        annotate(labelstudio, task_id)
    first, second = check_annotations(params), check_annotations(params)
    assert first.reached and first.build_flow_run_id == second.build_flow_run_id
    runs = runs_of(deployments[BUILD], {"project": str(p.id)}, settle_s=1)
    assert [str(r.id) for r in runs] == [first.build_flow_run_id]


@pytest.mark.parametrize("configured_as", ["id", "title"])
def test_a_crossing_for_another_project_makes_no_build_of_this_dataset(
    settings, labelstudio, bridge, deploy, projects, configured_as
):
    """The build deployment is pinned to its configured project: a signed crossing event for
    another project (same dataset in the query) is ignored; the configured one builds once,
    with the configured project, whatever the payload says."""
    url, secret = bridge
    (p, p_tasks), (q, q_tasks) = projects(), projects()
    configured = str(p.id) if configured_as == "id" else p.title
    deployments = deploy(configured)
    for task_id in p_tasks[:MIN_NEW] + q_tasks[:MIN_NEW]:
        annotate(labelstudio, task_id)

    def crossing(project) -> None:
        body = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1},
                "project": project_payload(settings, project.id)}
        r = httpx.post(f"{url}/labelstudio?min_new={MIN_NEW}&dataset={DATASET}", json=body,
                       headers={SECRET_HEADER: secret})
        assert r.status_code == 200 and len(r.json()["emitted"]) == 1

    crossing(q)  # accepted and emitted by the bridge, which knows no configured project
    for params in ({"project": str(q.id)}, {"project": configured}, {"project": q.title}):
        assert runs_of(deployments[BUILD], params, settle_s=3, timeout_s=8, want=0) == []

    crossing(p)
    runs = runs_of(deployments[BUILD], {"project": configured})
    assert len(runs) == 1 and runs[0].parameters["params"]["dataset"] == DATASET
    assert runs_of(deployments[BUILD], {"project": str(q.id)}, settle_s=1, timeout_s=3, want=0) == []


def test_a_finished_model_of_this_dataset_starts_drafting_and_others_do_not(prefect_harness, s3):
    """With drafts on, sftflow.finetune.succeeded for a model of this dataset starts one
    draft-responses run with that job; a model of another dataset starts none."""
    from prefect.events import emit_event

    from sftflow.core.events import FINETUNE_SUCCEEDED, dataset_resource, model_resource
    from sftflow.deployments.serve import DRAFTS

    cfg = ServeConfig(source=f"s3://{s3.bucket}/prompts/", project="7", dataset=DATASET,
                      base_model="m", bucket=s3.bucket, drafts="transformers")
    ids = {d.name: d.apply() for d in build_deployments(cfg)}
    triggers_loaded()
    for job, dataset in (("ft-mine", DATASET), ("ft-other", "another-dataset")):
        emit_event(event=FINETUNE_SUCCEEDED, resource=model_resource(job),
                   related=[{**dataset_resource(dataset), "prefect.resource.role": "dataset"}],
                   payload={"job": job, "dataset": dataset})
    runs = runs_of(ids[DRAFTS], {}, settle_s=4)
    assert [r.parameters["params"]["job"] for r in runs] == ["ft-mine"]
    assert runs[0].parameters["params"]["project"] == "7"
    assert runs[0].parameters["params"]["generator"] == "transformers"


def _set_state(run_id: str, state) -> None:
    """What the build's own end does to its run: the state it ended in, through the API."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, state, force=True)


@pytest.mark.parametrize("ending", ["failed", "completed"])
def test_a_crossing_whose_build_ended_without_a_version_gets_a_new_attempt(
    labelstudio, deploy, projects, s3, ending
):
    """Issue #10 item 1: a build that failed, or completed without committing (the baseline
    did not move), must not silence the schedule; an active attempt is never doubled."""
    from prefect.states import Completed, Failed

    p, task_ids = projects()
    deployments = deploy()
    params = CheckParams(project=p.title, dataset=DATASET, min_new=MIN_NEW, bucket=s3.bucket)
    for task_id in task_ids[:MIN_NEW]:
        annotate(labelstudio, task_id)
    first = check_annotations(params)
    assert check_annotations(params).build_flow_run_id == first.build_flow_run_id  # scheduled
    _set_state(first.build_flow_run_id,
               Failed(message="export failed") if ending == "failed" else Completed())
    second = check_annotations(params)
    assert second.reached and second.build_flow_run_id != first.build_flow_run_id
    third = check_annotations(params)  # the second attempt is still scheduled: reused
    assert third.build_flow_run_id == second.build_flow_run_id
    runs = runs_of(deployments[BUILD], {"project": str(p.id)}, settle_s=1, want=2)
    assert sorted(str(r.id) for r in runs) == sorted([first.build_flow_run_id,
                                                      second.build_flow_run_id])
