"""Turning incoming webhooks into Prefect events: pure logic, no HTTP server and no I/O.

Two sources:

- Label Studio webhooks (``{"action": ..., "project": {...counters}, "annotation"|"tasks": ...}``)
  for ANNOTATION_CREATED, ANNOTATIONS_CREATED, ANNOTATION_UPDATED and TASKS_CREATED become
  ``sftflow.annotation.created`` events carrying the project counters and, when the webhook URL
  names a threshold (``?min_new=N&dataset=D``), whether the project crossed it since the last
  dataset version. Other actions are ignored.
- S3 event notifications (AWS / MinIO ``{"Records": [{"eventName": "ObjectCreated:Put",
  "s3": {"bucket": {"name"}, "object": {"key", "size", "eTag"}}}]}``) become one
  ``sftflow.prompts.arrived`` event per created object. Test events and deletions are ignored.

Event ids are deterministic (uuid5), so a webhook delivered twice yields the same event id and
Prefect's trigger service processes it once. A threshold crossing has ONE id per
(project, dataset, baseline version, threshold): every webhook after the crossing repeats it
until a new dataset version moves the baseline, so a burst of webhooks makes one build.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from pydantic import ValidationError

from sftflow.core.events import (
    ANNOTATION_CREATED,
    PROMPTS_ARRIVED,
    THRESHOLD_LABEL,
    bucket_resource,
    project_resource,
)
from sftflow.tasks.triggers.counters import CountMode, ProjectCounters, Threshold, progress

SECRET_HEADER = "X-Sftflow-Secret"
LABELSTUDIO_ACTIONS = frozenset(
    {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "TASKS_CREATED"}
)
_NAMESPACE = uuid.UUID("6f1c3a52-3d0e-4a8e-9a55-5f7d1f0a1e21")

#: Resource label the build trigger matches on: "reached" | "below" | "unset".


class BadRequest(ValueError):
    """The request body is not what the endpoint accepts (answered with 400)."""


def secret_ok(provided: str | None, expected: str) -> bool:
    """Constant-time comparison; a missing header never matches."""
    if provided is None:
        return False
    return hmac.compare_digest(provided.encode(), expected.encode())


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"body is not JSON: {err}") from err


@dataclass(frozen=True)
class EventSpec:
    """What to emit: the arguments of ``prefect.events.Event``."""

    event: str
    resource: dict[str, str]
    payload: dict[str, Any]
    id: uuid.UUID


@dataclass
class Parsed:
    events: list[EventSpec] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # why each ignored item was ignored


@dataclass(frozen=True)
class ThresholdQuery:
    """The threshold named in the webhook URL's query string (all optional)."""

    min_new: int | None = None
    dataset: str | None = None
    count: CountMode = "tasks"
    min_annotations_per_task: int = 1

    @classmethod
    def from_query(cls, query: dict[str, str]) -> ThresholdQuery:
        try:
            min_new = int(query["min_new"]) if query.get("min_new") else None
            k = int(query.get("k") or 1)
        except ValueError as err:
            raise BadRequest(f"bad query parameter: {err}") from err
        count = query.get("count") or "tasks"
        if count not in ("tasks", "annotations"):
            raise BadRequest(f"count must be 'tasks' or 'annotations', not {count!r}")
        if (min_new is not None and min_new < 1) or k < 1:
            raise BadRequest("min_new and k must be >= 1")
        return cls(min_new, query.get("dataset") or None, count, k)  # type: ignore[arg-type]

    def threshold(self) -> Threshold | None:
        if self.min_new is None:
            return None
        return Threshold(
            min_new=self.min_new, count=self.count,
            min_annotations_per_task=self.min_annotations_per_task,
        )


def labelstudio_project(body: Any) -> tuple[str, ProjectCounters | None]:
    """``(action, counters)`` of a Label Studio webhook body; counters None for ignored actions."""
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        raise BadRequest("not a Label Studio webhook: no 'action'")
    action = body["action"]
    if action not in LABELSTUDIO_ACTIONS:
        return action, None
    project = body.get("project")
    if not isinstance(project, dict):
        raise BadRequest(f"{action} webhook without a 'project' object (enable send_payload)")
    try:
        return action, ProjectCounters.from_project(project)
    except (ValueError, TypeError, ValidationError) as err:
        raise BadRequest(f"bad 'project' object: {err}") from err


def labelstudio_event(
    body: Any,
    raw: bytes,
    query: ThresholdQuery,
    baseline_version: str | None = None,
    baseline: dict[str, Any] | None = None,
) -> Parsed:
    """The event for one Label Studio webhook (``baseline`` from the dataset's last version)."""
    action, counters = labelstudio_project(body)
    if counters is None:
        return Parsed(ignored=[f"action {action}"])
    threshold = query.threshold()
    payload: dict[str, Any] = {
        "action": action,
        "project_id": counters.project_id,
        "project": counters.title,
        "counters": counters.model_dump(exclude={"project_id", "title"}),
        "dataset": query.dataset,
    }
    state = "unset"
    event_id = uuid.uuid5(_NAMESPACE, "body:" + hashlib.sha256(raw).hexdigest())
    if threshold is not None:
        p = progress(counters, threshold, baseline)
        state = "reached" if p.reached else "below"
        payload.update(
            min_new=p.min_new, count=query.count, counter=p.counter, current=p.current,
            baseline=p.baseline, baseline_version=baseline_version, new=p.new, reached=p.reached,
        )
        if p.reached:
            crossing = ":".join(
                str(x) for x in (counters.project_id, query.dataset, baseline_version,
                                 query.count, query.min_annotations_per_task, p.min_new)
            )
            payload["crossing"] = crossing
            event_id = uuid.uuid5(_NAMESPACE, "crossing:" + crossing)
    resource = {
        **project_resource(counters.project_id),
        "prefect.resource.name": counters.title,
        THRESHOLD_LABEL: state,
        "sftflow.dataset": query.dataset or "",
    }
    return Parsed(events=[EventSpec(ANNOTATION_CREATED, resource, payload, event_id)])


def s3_events(body: Any) -> Parsed:
    """One ``prompts.arrived`` event per object-created record."""
    if not isinstance(body, dict):
        raise BadRequest("not an S3 notification: body is not an object")
    if "Records" not in body:
        if body.get("Event") == "s3:TestEvent" or body.get("Event") == "s3:TestEvent".lower():
            return Parsed(ignored=["s3:TestEvent"])
        raise BadRequest("not an S3 notification: no 'Records'")
    records = body["Records"]
    if not isinstance(records, list):
        raise BadRequest("'Records' is not a list")
    parsed = Parsed()
    for i, rec in enumerate(records):
        try:
            name = str(rec.get("eventName", ""))
            bucket = rec["s3"]["bucket"]["name"]
            obj = rec["s3"]["object"]
            key = unquote_plus(obj["key"])
        except (AttributeError, KeyError, TypeError) as err:
            raise BadRequest(f"Records[{i}] lacks s3.bucket.name / s3.object.key") from err
        if "ObjectCreated" not in name:
            parsed.ignored.append(f"{name or 'no eventName'} s3://{bucket}/{key}")
            continue
        etag = str(obj.get("eTag") or obj.get("etag") or "")
        payload = {
            "bucket": bucket, "key": key, "uri": f"s3://{bucket}/{key}",
            "size": obj.get("size"), "etag": etag, "event_name": name,
        }
        identity = f"s3:{bucket}/{key}@{etag}:{obj.get('sequencer', '')}"
        resource = {**bucket_resource(bucket, key), "sftflow.bucket": bucket}
        parsed.events.append(
            EventSpec(PROMPTS_ARRIVED, resource, payload, uuid.uuid5(_NAMESPACE, identity))
        )
    return parsed


# -- registering the Label Studio webhook ---------------------------------------------------------
def webhook_url(base_url: str, query: ThresholdQuery) -> str:
    """The bridge URL with the threshold in its query string (what Label Studio will call)."""
    from urllib.parse import urlencode

    params: dict[str, Any] = {}
    if query.min_new is not None:
        params["min_new"] = query.min_new
    if query.dataset:
        params["dataset"] = query.dataset
    if query.count != "tasks":
        params["count"] = query.count
    if query.min_annotations_per_task != 1:
        params["k"] = query.min_annotations_per_task
    base = base_url.split("?", 1)[0]
    return f"{base}?{urlencode(params)}" if params else base


def register_webhook(client: Any, project_id: int, url: str, secret: str) -> dict[str, Any]:
    """Create, or update in place, the project's webhook to ``url`` (same path = same webhook).

    Idempotent: running it again updates the one webhook instead of adding another. The
    secret travels only in the webhook's headers; the returned summary does not contain it.
    """
    base = url.split("?", 1)[0]
    existing = [
        w for w in client.webhooks.list(project=str(project_id))
        if getattr(w, "project", None) == project_id and str(w.url).split("?", 1)[0] == base
    ]
    fields: dict[str, Any] = {
        "url": url,
        "headers": {SECRET_HEADER: secret},
        "actions": sorted(LABELSTUDIO_ACTIONS),
        "send_payload": True,
        "send_for_all_actions": False,
        "is_active": True,
    }
    if existing:
        hook = existing[0]
        client.webhooks.update(id=hook.id, **fields)
        created, hook_id = False, hook.id
    else:
        hook_id = client.webhooks.create(project=project_id, **fields).id
        created = True
    return {"webhook_id": hook_id, "project_id": project_id, "url": url, "created": created,
            "actions": fields["actions"], "duplicates_left": max(0, len(existing) - 1)}
