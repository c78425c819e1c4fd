"""The bridge (``sftflow/bridge.py``) served for real, emitting into the Prefect harness, with
the real Label Studio behind it (issue #18, item 10): a malformed body gets a 4xx naming what
is wrong, never a 500; a body claiming a threshold crossing is checked against Label Studio's
own counters before a crossing event is emitted."""

from __future__ import annotations

import contextvars
import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest
import uvicorn

from sftflow.core.events import ANNOTATION_CREATED, THRESHOLD_LABEL, project_resource
from sftflow.tasks.ingest.projects import SFT_LABEL_CONFIG
from sftflow.tasks.runtime.polling import Backoff, wait_until
from sftflow.tasks.triggers.webhooks import SECRET_HEADER
from tests.conftest import unique
from tests.faults.proxy import Fault, FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

MIN_NEW = 2
QUERY = f"min_new={MIN_NEW}&dataset=d"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def serve(prefect_harness, settings, s3):
    """``serve(labelstudio_url=None, **options)``: the real bridge app on a loopback port,
    emitting to the harness, baselines from ``s3``'s bucket, Label Studio at the stack's URL or
    the one given; ``options`` go to ``create_app`` (its defaults otherwise)."""
    from sftflow.bridge import create_app

    servers = []

    def start(labelstudio_url: str | None = None, **options) -> tuple[str, str]:
        update = {"s3": settings.s3.model_copy(update={"bucket": s3.bucket})}
        if labelstudio_url:
            update["labelstudio"] = settings.labelstudio.model_copy(update={"url": labelstudio_url})
        cfg = settings.model_copy(update=update)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(cfg, **options), host="127.0.0.1", port=port,
                                               log_level="warning"))
        ctx = contextvars.copy_context()  # carries the harness's PREFECT_API_URL into the thread
        thread = threading.Thread(target=ctx.run, args=(server.run,), daemon=True)
        thread.start()
        servers.append((server, thread))
        assert wait_until(lambda: server.started, timeout_s=20, backoff=Backoff(0.05, 0.2))
        return f"http://127.0.0.1:{port}", cfg.webhooks.secret.get_secret_value()

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


@pytest.fixture()
def project(labelstudio):
    """A real project with four tasks and no annotations."""
    p = labelstudio.projects.create(title=unique("t-bridge"), label_config=SFT_LABEL_CONFIG)
    ids = labelstudio.projects.import_tasks(
        id=p.id, request=[{"prompt": f"q {i}"} for i in range(4)], return_task_ids=True).task_ids
    yield p, ids
    labelstudio.projects.delete(id=p.id)


def project_payload(settings, project_id: int) -> dict:
    """What Label Studio puts in a webhook's ``project`` (same serializer as the API)."""
    token = settings.labelstudio.api_key.get_secret_value()
    resp = httpx.get(f"{settings.labelstudio.url}/api/projects/{project_id}",
                     headers={"Authorization": f"Token {token}"})
    resp.raise_for_status()
    return resp.json()


def annotation_events(project_id: int, want: int = 1) -> list:
    """The ``annotation.created`` events Prefect stored for the project, once ``want`` are
    there (or after 30 s), read again 2 s later in case more are still on their way."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    flt = EventFilter(event=EventNameFilter(name=[ANNOTATION_CREATED]),
                      resource=EventResourceFilter(
                          id=[project_resource(project_id)["prefect.resource.id"]]))

    def read() -> list:
        with get_client(sync_client=True) as client:
            return list(client.read_events(filter=flt, limit=50).events)

    wait_until(lambda: len(read()) >= want, timeout_s=30, backoff=Backoff(0.5, 2.0))
    time.sleep(2)
    return read()


def post(url: str, secret: str, path: str, body: bytes | dict) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, timeout=30,
                      headers={SECRET_HEADER: secret, "Content-Type": "application/json"})


def webhook(project: dict) -> dict:
    return {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "project": project}


DEEP = b"[" * 10_000 + b"]" * 10_000
GOOD = {"id": 5, "title": "p", "num_tasks_with_annotations": 1, "total_annotations_number": 1}
BAD_BODIES = {
    # (body, a word the answer must name)
    "nested 10,000 deep": (DEEP, "nest"),
    "nested 10,000 deep inside a webhook":
        (b'{"action": "ANNOTATION_CREATED", "annotation": ' + DEEP + b', "project": {"id": 5}}',
         "nest"),
    "10^400 as a counter": (json.dumps(webhook({**GOOD, "num_tasks_with_annotations": 10**400}))
                            .encode(), "num_tasks_with_annotations"),
    "1e400 as a counter": (b'{"action": "ANNOTATION_CREATED", "project": {"id": 5, "total_'
                           + b'annotations_number": 1e400}}', "total_annotations_number"),
    "a number of 5,000 digits": (b'{"action": "ANNOTATION_CREATED", "project": {"id": 1'
                                 + b"0" * 5000 + b"}}", "number"),
    "10^400 as the project id": (json.dumps(webhook({**GOOD, "id": 10**400})).encode(), "id"),
    "a string where a number belongs": (json.dumps(webhook({**GOOD, "num_tasks_with_annotations":
                                        "12"})).encode(), "num_tasks_with_annotations"),
    "a boolean where a number belongs": (json.dumps(webhook({**GOOD, "task_number": True}))
                                         .encode(), "task_number"),
    "a negative counter": (json.dumps(webhook({**GOOD, "num_tasks_with_annotations": -3}))
                           .encode(), "num_tasks_with_annotations"),
    "an object as the title": (json.dumps(webhook({**GOOD, "title": {"a": 1}})).encode(), "title"),
    "a JSON array": (b"[1, 2]", "object"),
    "a JSON number": (b"5", "object"),
    "a JSON string": (b'"ANNOTATION_CREATED"', "object"),
    "JSON null": (b"null", "object"),
}
BAD_S3 = {
    "nested 10,000 deep": (DEEP, "nest"),
    "1e400 as the size": (b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": '
                          + b'{"name": "b"}, "object": {"key": "k", "size": 1e400}}}]}', "size"),
    "an object as the bucket name": (json.dumps({"Records": [{"eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": {"x": 1}}, "object": {"key": "k"}}}]}).encode(), "name"),
    "a string as the size": (json.dumps({"Records": [{"eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": "b"}, "object": {"key": "k", "size": "big"}}}]}).encode(),
        "size"),
    "a JSON array": (b"[1, 2]", "object"),
}


def test_malformed_bodies_get_a_4xx_naming_what_is_wrong(serve):
    url, secret = serve()
    answers = {}
    for path, cases in ((f"/labelstudio?{QUERY}", BAD_BODIES), ("/s3", BAD_S3)):
        for name, (body, word) in cases.items():
            r = post(url, secret, path, body)
            answers[f"{path} {name}"] = (r.status_code, r.text[:200], word)
    wrong = {k: v for k, v in answers.items()
             if v[0] not in (400, 413, 422) or v[2].lower() not in v[1].lower()}
    assert not wrong, wrong
    # Threshold parameters Label Studio's overlap cannot meet: the caller's mistake, not ours.
    r = post(url, secret, "/labelstudio?min_new=1&k=3", webhook(GOOD))
    assert r.status_code == 422 and "overlap" in r.text
    counts = httpx.get(f"{url}/health").json()["counts"]
    assert counts.get("emitted", 0) == 0 and counts["bad_request"] == len(answers) + 1


def test_a_forged_crossing_is_checked_against_label_studio_and_emits_none(
    settings, serve, project
):
    # What is checked here is the verdict, not its speed (the last test): a timeout that a
    # loaded machine meets.
    url, secret = serve(verify_timeout_s=5)
    p, _ = project
    forged = project_payload(settings, p.id)
    assert forged["num_tasks_with_annotations"] == 0
    forged.update(num_tasks_with_annotations=50, total_annotations_number=50)
    r = post(url, secret, f"/labelstudio?{QUERY}", webhook(forged))
    assert r.status_code == 200
    (event,) = annotation_events(p.id)
    assert event.resource.get(THRESHOLD_LABEL) == "below"  # Label Studio's counters say so
    assert event.payload["counters"]["num_tasks_with_annotations"] == 0
    assert (event.payload["counters_from"], event.payload["reached"]) == ("labelstudio", False)
    # A project that Label Studio does not have at all: refused, nothing emitted.
    r = post(url, secret, f"/labelstudio?{QUERY}", webhook({**forged, "id": 999_999_999}))
    assert r.status_code == 422 and "999999999" in r.text
    assert httpx.get(f"{url}/health").json()["counts"]["emitted"] == 1


def annotate(client, task_id: int) -> None:
    client.annotations.create(id=task_id, result=[{
        "from_name": "instruction", "to_name": "prompt", "type": "textarea",
        "value": {"text": ["a response"]}}])


def test_a_real_crossing_is_verified_and_emitted(settings, labelstudio, serve, project):
    url, secret = serve(verify_timeout_s=5)
    p, task_ids = project
    for task_id in task_ids[:MIN_NEW]:
        annotate(labelstudio, task_id)
    r = post(url, secret, f"/labelstudio?{QUERY}", webhook(project_payload(settings, p.id)))
    assert r.status_code == 200 and len(r.json()["emitted"]) == 1
    (event,) = annotation_events(p.id)
    assert event.resource.get(THRESHOLD_LABEL) == "reached" and event.payload["new"] == MIN_NEW


def test_when_label_studio_is_slow_the_answer_stays_fast_and_no_crossing_is_emitted(
    settings, labelstudio, serve, project, stack
):
    """Label Studio waits 1 s for a webhook's answer: the counter check gives up well before
    that, emits no crossing, and leaves it to the scheduled check."""
    p, task_ids = project
    for task_id in task_ids[:MIN_NEW]:
        annotate(labelstudio, task_id)  # a genuine crossing, which cannot be verified in time
    up = urlparse(stack.labelstudio.url)
    with FaultProxy(up.hostname, up.port) as proxy:
        proxy.add(Fault("delay", method="GET", path=rf"^/api/projects/{p.id}", seconds=5, times=0))
        url, secret = serve(proxy.url)
        body = webhook(project_payload(settings, p.id))
        started = time.monotonic()
        r = post(url, secret, f"/labelstudio?{QUERY}", body)
        elapsed = time.monotonic() - started
    assert r.status_code == 200 and elapsed < 1.0, (r.status_code, elapsed)
    assert r.json()["emitted"] == [] and "not verified" in r.json()["ignored"][0]
    assert proxy.applied["delay"] >= 1
    counts = httpx.get(f"{url}/health").json()["counts"]
    assert counts["unverified"] == 1 and counts.get("emitted", 0) == 0


def test_a_body_below_the_threshold_costs_no_label_studio_call(
    settings, labelstudio, serve, project, stack
):
    """Its own count cannot reach ``min_new`` whatever the baseline: the bridge emits the
    ``below`` event without asking Label Studio (it asked on every body before)."""
    p, task_ids = project
    annotate(labelstudio, task_ids[0])  # 1 of MIN_NEW
    up = urlparse(stack.labelstudio.url)
    with FaultProxy(up.hostname, up.port) as proxy:
        url, secret = serve(proxy.url)
        r = post(url, secret, f"/labelstudio?{QUERY}", webhook(project_payload(settings, p.id)))
        assert r.status_code == 200 and len(r.json()["emitted"]) == 1
        assert proxy.requests == 0
    (event,) = annotation_events(p.id)
    assert event.resource.get(THRESHOLD_LABEL) == "below"
