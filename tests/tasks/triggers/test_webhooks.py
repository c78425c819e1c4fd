"""The bridge's parsing and HTTP rules, without services: what is emitted, refused, ignored."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from sftflow.bridge import create_app
from sftflow.core.events import ANNOTATION_CREATED, PROMPTS_ARRIVED, THRESHOLD_LABEL
from sftflow.core.settings import Settings
from sftflow.tasks.triggers.counters import ProjectCounters
from sftflow.tasks.triggers.webhooks import (
    SECRET_HEADER,
    BadRequest,
    ThresholdQuery,
    claims_crossing,
    labelstudio_event,
    labelstudio_project,
    parse_json,
    s3_events,
    secret_ok,
    webhook_url,
)

SECRET = "s3cr3t"


def ls_body(done: int, action: str = "ANNOTATION_CREATED") -> dict:
    return {"action": action, "annotation": {"id": 1, "task": 1},
            "project": {"id": 5, "title": "proj", "num_tasks_with_annotations": done,
                        "total_annotations_number": done, "task_number": 50}}


def s3_body(*keys: str, event: str = "ObjectCreated:Put") -> dict:
    return {"Records": [{"eventName": event, "s3": {"bucket": {"name": "b"},
            "object": {"key": k, "size": 3, "eTag": "e", "sequencer": "01"}}} for k in keys]}


def test_secret_compare():
    assert secret_ok("abc", "abc") and not secret_ok("abd", "abc")
    assert not secret_ok(None, "abc") and not secret_ok("", "abc")


def test_threshold_crossing_events_share_one_id_until_the_baseline_moves():
    q = ThresholdQuery(min_new=10, dataset="d")
    below = labelstudio_event(ls_body(9), b"x", q).events[0]
    assert below.event == ANNOTATION_CREATED and below.resource[THRESHOLD_LABEL] == "below"
    a = labelstudio_event(ls_body(10), b"a", q, "v1", None).events[0]
    b = labelstudio_event(ls_body(14), b"b", q, "v1", None).events[0]
    assert a.resource[THRESHOLD_LABEL] == "reached" and a.id == b.id
    assert a.payload["new"] == 10 and a.payload["project_id"] == 5 and a.payload["dataset"] == "d"
    c = labelstudio_event(ls_body(30), b"c", q, "v2",
                          {"project_id": 5, "num_tasks_with_annotations": 20}).events[0]
    assert c.resource[THRESHOLD_LABEL] == "reached" and c.id != a.id
    # Without a threshold in the URL: counters only, label "unset"; same body -> same id.
    u1 = labelstudio_event(ls_body(3), b"same", ThresholdQuery()).events[0]
    u2 = labelstudio_event(ls_body(3), b"same", ThresholdQuery()).events[0]
    assert u1.resource[THRESHOLD_LABEL] == "unset" and u1.id == u2.id


def test_unknown_action_is_ignored_and_bad_bodies_are_refused():
    assert labelstudio_event({"action": "PROJECT_UPDATED"}, b"", ThresholdQuery()).ignored
    for bad in ([], {"no": "action"}, {"action": "ANNOTATION_CREATED"},
                {"action": "ANNOTATION_CREATED", "project": {"title": "no id"}}):
        with pytest.raises(BadRequest):
            labelstudio_event(bad, b"", ThresholdQuery())
    with pytest.raises(BadRequest):
        ThresholdQuery.from_query({"min_new": "ten"})


def test_bodies_are_read_within_bounds_and_checked_strictly():
    with pytest.raises(BadRequest, match="nested too deeply") as err:
        parse_json(b"[" * 10_000 + b"]" * 10_000)
    assert err.value.status == 400
    with pytest.raises(BadRequest, match="number"):
        parse_json(b"1" + b"0" * 5000)
    with pytest.raises(BadRequest, match="NaN"):
        parse_json(b'{"a": NaN}')
    for project, field in (({"id": 5, "task_number": "3"}, "task_number"),
                           ({"id": 5, "total_annotations_number": 10**400},
                            "total_annotations_number"),
                           ({"id": 5.0}, "id"), ({"id": True}, "id"),
                           ({"id": 5, "title": 3}, "title")):
        with pytest.raises(BadRequest, match=f"project.{field}") as err:
            labelstudio_project({"action": "ANNOTATION_CREATED", "project": project})
        assert err.value.status == 422
    with pytest.raises(BadRequest, match="overlap") as err:
        labelstudio_event(ls_body(3), b"", ThresholdQuery(min_new=1, min_annotations_per_task=3))
    assert err.value.status == 422
    with pytest.raises(BadRequest, match="from 1 to"):
        ThresholdQuery.from_query({"min_new": str(2**64)})


def test_a_claimed_crossing_is_decided_by_the_counters_label_studio_gives():
    q = ThresholdQuery(min_new=10, dataset="d")
    assert claims_crossing(ls_body(9), q, None) is None
    assert claims_crossing(ls_body(12), q, None) == 5
    assert claims_crossing(ls_body(12), ThresholdQuery(), None) is None  # no threshold: no claim
    real = ProjectCounters(project_id=5, title="proj", num_tasks_with_annotations=0)
    (event,) = labelstudio_event(ls_body(12), b"x", q, verified=real).events
    assert event.resource[THRESHOLD_LABEL] == "below" and "crossing" not in event.payload
    assert event.payload["counters_from"] == "labelstudio" and event.payload["new"] == 0
    (event,) = labelstudio_event(ls_body(12), b"x", q).events
    assert event.payload["counters_from"] == "webhook"


def test_s3_records():
    parsed = s3_events(s3_body("prompts/a+b.jsonl", "prompts/c.jsonl"))
    assert [e.payload["key"] for e in parsed.events] == ["prompts/a b.jsonl", "prompts/c.jsonl"]
    assert parsed.events[0].event == PROMPTS_ARRIVED
    assert parsed.events[0].payload["uri"] == "s3://b/prompts/a b.jsonl"
    assert s3_events(s3_body("x", event="ObjectRemoved:Delete")).ignored
    assert s3_events({"Event": "s3:TestEvent"}).ignored
    with pytest.raises(BadRequest):
        s3_events({"Records": [{"s3": {}}]})
    for rec, where in (({"s3": {"bucket": {"name": 1}, "object": {"key": "k"}}}, "bucket.name"),
                       ({"s3": {"bucket": {"name": "b"}, "object": {"key": "k", "size": 1.5}}},
                        "size"),
                       ({"s3": {"bucket": {"name": "b"}, "object": {"key": ["k"]}}}, "key"),
                       ("x", "Records\\[0\\]")):
        with pytest.raises(BadRequest, match=where) as err:
            s3_events({"Records": [{"eventName": "ObjectCreated:Put", **rec}
                                   if isinstance(rec, dict) else rec]})
        assert err.value.status == 422


def test_webhook_url_carries_the_threshold():
    url = webhook_url("http://h:1/labelstudio", ThresholdQuery(min_new=5, dataset="d"))
    assert url == "http://h:1/labelstudio?min_new=5&dataset=d"


@pytest.fixture()
def bridge():
    emitted: list = []

    async def emit(specs):
        emitted.extend(specs)

    settings = Settings(webhooks={"secret": SECRET, "max_body_bytes": 2000})
    app = create_app(settings, emitter=emit, baseline_loader=lambda d: (None, None))
    with TestClient(app) as client:
        yield client, emitted


def test_http_rules(bridge):
    client, emitted = bridge
    ok = {SECRET_HEADER: SECRET}
    assert client.post("/labelstudio", json=ls_body(1)).status_code == 401
    assert client.post("/labelstudio", json=ls_body(1), headers={SECRET_HEADER: "no"}).status_code == 401
    assert client.post("/s3", content=b"{not json", headers=ok).status_code == 400
    assert client.post("/s3", content=b"x" * 2001, headers=ok).status_code == 413
    assert emitted == []
    r = client.post("/labelstudio", json={"action": "PROJECT_UPDATED"}, headers=ok)
    assert r.status_code == 200 and r.json()["ignored"] == ["action PROJECT_UPDATED"]
    # Below the threshold: emitted as the body says, without asking Label Studio (a claimed
    # crossing is checked against Label Studio's counters: tests/sftflow/test_bridge.py).
    r = client.post("/labelstudio?min_new=5&dataset=d", json=ls_body(1), headers=ok)
    assert r.status_code == 200 and len(r.json()["emitted"]) == 1
    assert emitted[0].resource[THRESHOLD_LABEL] == "below"
    r = client.post("/s3", content=json.dumps(s3_body("p/1.jsonl")), headers=ok)
    assert r.status_code == 200 and [e.event for e in emitted] == [ANNOTATION_CREATED, PROMPTS_ARRIVED]
    counts = client.get("/health").json()["counts"]
    assert counts == {"requests": 7, "unauthorized": 2, "bad_request": 1, "too_large": 1,
                      "ignored": 1, "emitted": 2}
