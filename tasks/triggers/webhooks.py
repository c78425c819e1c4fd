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

Nothing in a body is trusted: it is parsed within bounds (nesting, number size) and checked
strictly (JSON integers within 64 bits where counters belong, strings where names belong);
anything else is a ``BadRequest`` naming what is wrong (400 for what is not a JSON object,
422 for an object of the wrong shape). A body whose counters claim a threshold crossing is only
a claim: the bridge checks it against Label Studio's own counters (``claims_crossing``, then
``labelstudio_event(..., verified=...)``) before a crossing is emitted.

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

from sftflow.core.errors import ConfigError
from sftflow.core.events import (
    ANNOTATION_CREATED,
    PROMPTS_ARRIVED,
    THRESHOLD_LABEL,
    bucket_resource,
    project_resource,
)
from sftflow.tasks.triggers.counters import (
    MAX_COUNT,
    CountMode,
    ProjectCounters,
    Threshold,
    counters_from_webhook,
    progress,
)

SECRET_HEADER = "X-Sftflow-Secret"
LABELSTUDIO_ACTIONS = frozenset(
    {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "TASKS_CREATED"}
)
_NAMESPACE = uuid.UUID("6f1c3a52-3d0e-4a8e-9a55-5f7d1f0a1e21")

#: Resource label the build trigger matches on: "reached" | "below" | "unset".


class BadRequest(ValueError):
    """The request is not what the endpoint accepts: answered with ``status`` (400: not JSON,
    nested too deeply, not an object; 422: an object of the wrong shape or values)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _unprocessable(message: str) -> BadRequest:
    return BadRequest(message, status=422)


def secret_ok(provided: str | None, expected: str) -> bool:
    """Constant-time comparison; a missing header never matches."""
    if provided is None:
        return False
    return hmac.compare_digest(provided.encode(), expected.encode())


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes) -> Any:
    """The body as JSON; BadRequest (400) for what is not JSON or is nested deeper than the
    parser follows (RecursionError), or holds a number too long to read (over 4300 digits)."""
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"body is not JSON: {err}") from err
    except RecursionError:
        raise BadRequest("body is nested too deeply to read") from None
    except ValueError as err:  # an integer literal past Python's digit limit, NaN, Infinity
        raise BadRequest(f"body holds a number that cannot be read: {str(err)[:120]}") from None


_JSON_KINDS = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
               float: "number", type(None): "null"}


def _kind(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _require_object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"not {what}: the body is a JSON {_kind(body)}, not an object")
    return body


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
            raise BadRequest(f"bad query parameter: {str(err)[:120]}") from None
        count = query.get("count") or "tasks"
        if count not in ("tasks", "annotations"):
            raise BadRequest(f"count must be 'tasks' or 'annotations', not {count[:40]!r}")
        if not (1 <= (min_new or 1) <= MAX_COUNT and 1 <= k <= MAX_COUNT):
            raise BadRequest(f"min_new and k must be from 1 to {MAX_COUNT}")
        return cls(min_new, query.get("dataset") or None, count, k)  # type: ignore[arg-type]

    def threshold(self) -> Threshold | None:
        if self.min_new is None:
            return None
        return Threshold(
            min_new=self.min_new, count=self.count,
            min_annotations_per_task=self.min_annotations_per_task,
        )


def labelstudio_project(body: Any) -> tuple[str, ProjectCounters | None]:
    """``(action, counters the body claims)`` of a Label Studio webhook body; counters None
    for ignored actions. BadRequest naming what is wrong (422 for a wrong field)."""
    body = _require_object(body, "a Label Studio webhook")
    action = body.get("action")
    if not isinstance(action, str):
        raise _unprocessable(
            f"not a Label Studio webhook: 'action' is {_kind(action)}, not a string")
    if action not in LABELSTUDIO_ACTIONS:
        return action[:100], None
    project = body.get("project")
    if not isinstance(project, dict):
        raise _unprocessable(f"{action} webhook without a 'project' object (enable send_payload)")
    try:
        return action, counters_from_webhook(project)
    except (ValueError, TypeError, ValidationError) as err:
        raise _unprocessable(f"bad 'project' object: {str(err)[:500]}") from None


def _progress(counters: ProjectCounters, threshold: Threshold, baseline: dict[str, Any] | None):
    try:
        return progress(counters, threshold, baseline)
    except ConfigError as err:  # k that the project's overlap cannot meet
        raise _unprocessable(str(err)) from None
    except (ValueError, TypeError) as err:  # a baseline the manifest recorded badly
        raise _unprocessable(f"cannot compare with the dataset's baseline: {err}") from None


def claims_crossing(
    body: Any, query: ThresholdQuery, baseline: dict[str, Any] | None
) -> int | None:
    """The project id whose counters the body claims have crossed the URL's threshold (to be
    checked against Label Studio before a crossing is emitted); None when it claims none."""
    _, counters = labelstudio_project(body)
    threshold = query.threshold()
    if counters is None or threshold is None:
        return None
    return counters.project_id if _progress(counters, threshold, baseline).reached else None


def labelstudio_event(
    body: Any,
    raw: bytes,
    query: ThresholdQuery,
    baseline_version: str | None = None,
    baseline: dict[str, Any] | None = None,
    *,
    verified: ProjectCounters | None = None,
) -> Parsed:
    """The event for one Label Studio webhook (``baseline`` from the dataset's last version).

    ``verified``: the project's counters as Label Studio itself answered them (the bridge reads
    them when the body claims a crossing); they replace the body's, so a forged or stale claim
    yields the event its real counters give (``below``), never a crossing."""
    action, counters = labelstudio_project(body)
    if counters is None:
        return Parsed(ignored=[f"action {action}"])
    if verified is not None:
        if verified.project_id != counters.project_id:
            raise ValueError(
                f"counters of project {verified.project_id}, not {counters.project_id}")
        counters = verified
    threshold = query.threshold()
    payload: dict[str, Any] = {
        "action": action,
        "project_id": counters.project_id,
        "project": counters.title,
        "counters": counters.model_dump(exclude={"project_id", "title"}),
        "dataset": query.dataset,
        "counters_from": "labelstudio" if verified is not None else "webhook",
    }
    state = "unset"
    event_id = uuid.uuid5(_NAMESPACE, "body:" + hashlib.sha256(raw).hexdigest())
    if threshold is not None:
        p = _progress(counters, threshold, baseline)
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


def _at(obj: Any, where: str, *path: str) -> Any:
    """``obj[path[0]][path[1]]...``; a 422 naming the first step that is not an object."""
    for step in path:
        if not isinstance(obj, dict):
            raise _unprocessable(f"{where} is a JSON {_kind(obj)}, not an object")
        obj, where = obj.get(step), f"{where}.{step}"
    return obj


def _s3_string(value: Any, where: str, *, required: bool) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise _unprocessable(f"{where} must be a non-empty string, not a JSON {_kind(value)}")
    return value


def _s3_record(i: int, rec: Any) -> dict[str, Any]:
    """``Records[i]`` checked field by field: names are strings, the size an integer."""
    where = f"Records[{i}]"
    obj = _at(rec, where, "s3", "object")
    _at(obj, f"{where}.s3.object", "key")  # an object, or a 422 naming it
    size = obj.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                             or not 0 <= size <= MAX_COUNT):
        raise _unprocessable(f"{where}.s3.object.size must be an integer from 0 to {MAX_COUNT}")
    return {
        "event_name": _s3_string(_at(rec, where, "eventName"), f"{where}.eventName",
                                 required=False),
        "bucket": _s3_string(_at(rec, where, "s3", "bucket", "name"), f"{where}.s3.bucket.name",
                             required=True),
        "key": unquote_plus(_s3_string(obj.get("key"), f"{where}.s3.object.key", required=True)),
        "size": size,
        "etag": _s3_string(obj.get("eTag") or obj.get("etag"), f"{where}.s3.object.eTag",
                           required=False),
        "sequencer": _s3_string(obj.get("sequencer"), f"{where}.s3.object.sequencer",
                                required=False),
    }


def s3_events(body: Any) -> Parsed:
    """One ``prompts.arrived`` event per object-created record."""
    body = _require_object(body, "an S3 notification")
    if "Records" not in body:
        if body.get("Event") in ("s3:TestEvent", "s3:testevent"):
            return Parsed(ignored=["s3:TestEvent"])
        raise _unprocessable("not an S3 notification: no 'Records'")
    records = body["Records"]
    if not isinstance(records, list):
        raise _unprocessable(f"'Records' is a JSON {_kind(records)}, not a list")
    parsed = Parsed()
    for i, rec in enumerate(records):
        r = _s3_record(i, rec)
        name, bucket, key, etag = r["event_name"], r["bucket"], r["key"], r["etag"]
        if "ObjectCreated" not in name:
            parsed.ignored.append(f"{name or 'no eventName'} s3://{bucket}/{key}")
            continue
        payload = {
            "bucket": bucket, "key": key, "uri": f"s3://{bucket}/{key}",
            "size": r["size"], "etag": etag, "event_name": name,
        }
        identity = f"s3:{bucket}/{key}@{etag}:{r['sequencer']}"
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
