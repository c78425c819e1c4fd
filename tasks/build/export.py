"""Label Studio export snapshots, and the streaming parse of their JSON into SFT rows.

Snapshots (``POST /api/projects/<id>/exports``, poll until ``completed``, download) instead of
the synchronous ``/export`` endpoint, which times out on large projects; a snapshot lost to a
Label Studio restart (or failed) costs a new one within the same deadline. The downloaded JSON
(one array of tasks, about 2 KB a task) is spooled to a local file and parsed one task at a
time, so memory holds the rows we keep, never the whole document as Python objects.

A row (``SftRow``) is one (task, annotation) pair; it is the one record every build stage
passes on (filters, dedup, split, formats, versioning). Its ``prompt_id`` is ingest's id
(``tasks.ingest.prompts.prompt_id``) of the prompt text the task holds now: a prompt edited in
Label Studio after ingest is re-identified, whatever the task data's ``prompt_id`` says. Anything that cannot become a row is
counted by reason and returned as an ``Exclusion``, never raised; the later stages add their
own exclusions in the same shape.
"""

from __future__ import annotations

import codecs
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import httpx

from sftflow.core.errors import SftflowError
from sftflow.tasks.adapters.labelstudio import PROMPT_NAME, RESPONSE_NAME
from sftflow.tasks.build import edits
from sftflow.tasks.build.delta import ls_time
from sftflow.tasks.build.draft_return import lead_time
from sftflow.tasks.ingest.prompts import prompt_id as compute_prompt_id
from sftflow.tasks.runtime.declare import compute_task, io_task
from sftflow.tasks.runtime.polling import Backoff, is_transient, retry, wait_until
from sftflow.tasks.versions.rows import Exclusion, SftRow

AnnotationPolicy = Literal["latest", "ground_truth_first", "all"]
_log = logging.getLogger(__name__)


# -- snapshots ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    project_id: int
    export_id: int
    created_at: str  # ISO time the snapshot was taken (Label Studio's clock)
    md5: str | None = None


#: Snapshots one build asks for: another after one is lost (failed, gone, or cut short by a
#: Label Studio restart), all within the one export deadline.
MAX_SNAPSHOTS = 3

#: The export deadline scales with the project (issue #21): Label Studio builds a snapshot in
#: one request. The whole export stage (the snapshot, its download and the reading of every
#: task's state; bench/scale.py) took 1.2 ms a task at 300k tasks on a quiet machine (session
#: 14) and up to 4.1 ms on a slower, loaded one (session 13); it grows about as fast as the
#: project (exponent 1.02 over 55k-300k). The deadline allows 10 ms a task, twice the worst
#: rate seen, never less than the 900 s every project had before, and never more than 6 hours
#: (reached at 2.16M tasks).
EXPORT_DEADLINE_MIN_S = 900.0
EXPORT_DEADLINE_PER_TASK_S = 0.010
EXPORT_DEADLINE_MAX_S = 6 * 3600.0


def export_deadline(tasks: int) -> float:
    """Seconds a full export of a project of ``tasks`` tasks may take, snapshot retries
    included: 900 s up to 90,000 tasks, 10 ms a task above (300k: 3,000 s; 1M: 10,000 s),
    at most 6 hours."""
    scaled = max(0, int(tasks)) * EXPORT_DEADLINE_PER_TASK_S
    return min(EXPORT_DEADLINE_MAX_S, max(EXPORT_DEADLINE_MIN_S, scaled))


def _snapshot_titled(client: Any, project_id: int, title: str) -> Any | None:
    """The project's snapshot named ``title`` (made by a create whose answer was lost)."""
    mine = [e for e in client.projects.exports.list(id=int(project_id))
            if getattr(e, "title", None) == title]
    return min(mine, key=lambda e: int(e.id)) if mine else None


def _server_went_away(err: BaseException) -> bool:
    """Whether ``err`` says the Label Studio server may have died (a restart): a refused or
    dropped connection, a gateway's 502 or 503. A timeout or a 504 says it was slow, not gone."""
    if isinstance(err, httpx.ConnectError | httpx.RemoteProtocolError | httpx.ReadError
                  | httpx.WriteError):
        return True
    return getattr(err, "status_code", None) in (502, 503)


class _SnapshotRun:
    """One build's snapshot within one deadline: asked for (never blindly twice), waited for,
    and asked for again when it is lost."""

    def __init__(self, client: Any, project_id: int, timeout_s: float, poll: Backoff):
        self.client, self.project_id, self.timeout_s, self.poll = client, project_id, timeout_s, poll
        self.deadline = time.monotonic() + timeout_s
        #: the server seemed to die since the snapshot in hand was asked for: a snapshot it was
        #: building then will never complete (its builder died with it)
        self.went_away = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _note(self, err: BaseException, _attempt: int = 0) -> None:
        self.went_away = self.went_away or _server_went_away(err)

    def create(self) -> Any:
        """Ask for a new snapshot, under a title of its own: its first info (maybe in progress).
        A create whose outcome is unknown is looked up by that title before another is sent."""
        title, tried = f"sftflow build {uuid.uuid4().hex[:12]}", False
        self.went_away = False

        def attempt() -> Any:
            nonlocal tried
            if tried and (found := _snapshot_titled(self.client, self.project_id, title)):
                return found
            if self.left() <= 0:
                raise TimeoutError("no time left")
            tried = True
            return self.client.projects.exports.create(
                id=int(self.project_id), title=title,
                serialization_options=edits.EXPORT_SERIALIZATION,
                request_options={"timeout": max(self.left(), 1.0), "max_retries": 0})

        try:
            return retry(attempt, attempts=20, backoff=Backoff(1.0, 30.0),
                         timeout_s=max(self.left(), 0.0), on_retry=self._note)
        except Exception as err:
            if not is_transient(err):
                raise
            raise SftflowError(
                f"Label Studio export snapshot of project {self.project_id} not created within "
                f"the {self.timeout_s:.0f} s export deadline ({type(err).__name__}: {err})"
            ) from err

    def wait(self, created: Any) -> tuple[Any, str | None]:
        """Poll the snapshot until it completes: ``(info, None)``; or until it is lost:
        ``(info, why)`` when it failed, is gone (404), or is still in progress after the server
        went away. Raises SftflowError when the deadline passes first."""
        info, asked, lost = created, False, None

        def settled() -> bool:
            nonlocal info, asked, lost
            if asked:  # the first look is at the create response itself
                try:
                    info = self.client.projects.exports.get(
                        id=int(self.project_id), export_pk=int(created.id),
                        request_options={"timeout": max(min(self.left(), 60.0), 1.0)})
                except Exception as err:
                    if getattr(err, "status_code", None) == 404:
                        lost = "is gone"
                        return True
                    if not is_transient(err):
                        raise
                    self._note(err)
                    return False  # look again, within the deadline
            asked = True
            if info.status == "failed":
                lost = "failed"
            elif info.status != "completed" and self.went_away:
                lost = "was cut short by a Label Studio restart"
            return info.status == "completed" or lost is not None

        if not wait_until(settled, timeout_s=max(self.left(), 0.0), backoff=self.poll):
            raise SftflowError(
                f"Label Studio export snapshot {created.id} of project {self.project_id} not "
                f"completed within the {self.timeout_s:.0f} s export deadline (status "
                f"{info.status!r})")
        return info, lost


def create_snapshot(
    client: Any, project_id: int, *, timeout_s: float = 900.0, poll_min_s: float = 0.5,
    poll_max_s: float = 10.0,
) -> Snapshot:
    """Create an export snapshot and wait (backoff) until Label Studio completes it, all
    within ``timeout_s``, retries included.

    Without a Redis queue Label Studio builds the snapshot inside the create request (about
    60 s for 55k annotated tasks), so that request is given what is left of the deadline as
    its own timeout, not the client's per-request one. A create whose outcome is unknown (a
    timeout, a lost answer, a 5xx) is not blindly repeated: the snapshot is made under a title
    of its own, and the project's snapshots are searched for it before creating another.

    A snapshot can be lost: it failed, it is gone, or Label Studio went away (a refused or
    dropped connection, a 502/503: a restart) while it was in progress, and its builder died
    with the server (it would stay ``in_progress`` for ever). A lost snapshot costs a new one
    (the lost one is deleted, best effort), up to ``MAX_SNAPSHOTS``, within the same deadline.
    """
    run = _SnapshotRun(client, int(project_id), timeout_s, Backoff(poll_min_s, poll_max_s))
    lost = ""
    for _ in range(MAX_SNAPSHOTS):
        created = run.create()
        info, lost = run.wait(created)
        if lost is None:
            at = getattr(info, "created_at", None) or getattr(created, "created_at", None)
            return Snapshot(project_id=int(project_id), export_id=int(created.id),
                            created_at=at.isoformat() if at else "", md5=getattr(info, "md5", None))
        _log.warning("export snapshot %s of project %s %s: asking for a new one",
                     created.id, project_id, lost)
        delete_snapshot(client, Snapshot(int(project_id), int(created.id), ""))
        lost = f"snapshot {created.id} {lost}"
    raise SftflowError(f"Label Studio export snapshots of project {project_id} lost "
                       f"{MAX_SNAPSHOTS} times (the last: {lost})")


def download_snapshot(client: Any, snapshot: Snapshot, dest: Path) -> Path:
    """Stream the snapshot's JSON to ``dest`` (written whole or not at all). Returns ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    with part.open("wb") as out:
        for chunk in client.projects.exports.download(
            id=snapshot.project_id, export_pk=snapshot.export_id, export_type="JSON"
        ):
            out.write(chunk)
    part.replace(dest)
    return dest


def delete_snapshot(client: Any, snapshot: Snapshot) -> bool:
    """Best effort: snapshots are files on the Label Studio server; do not let them pile up.
    Returns whether it was deleted (a failure here must not fail the build)."""
    try:
        client.projects.exports.delete(id=snapshot.project_id, export_pk=snapshot.export_id)
    except Exception:  # noqa: BLE001 - cleanup only
        return False
    return True


# -- streaming JSON ----------------------------------------------------------------------------
def iter_json_array(fp: BinaryIO, chunk_size: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array read from a binary stream, one at a time.

    Uses the C scanner of ``json`` (``raw_decode``) on a sliding text buffer; an element cut at
    a chunk boundary is retried once more text has arrived.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof = "", 0, False
    started = False

    def fill() -> bool:
        nonlocal buf, pos, eof
        data = fp.read(chunk_size)
        if not data:
            eof = True
            buf = buf[pos:] + utf8.decode(b"", final=True)
        else:
            buf = buf[pos:] + utf8.decode(data)
        pos = 0
        return not eof

    def skip_ws() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or eof or not fill():
                return

    skip_ws()
    if pos >= len(buf) or buf[pos] != "[":
        raise ValueError("export is not a JSON array")
    pos += 1
    started = True
    while started:
        skip_ws()
        if pos >= len(buf):
            raise ValueError("export JSON ends inside the array")
        if buf[pos] == "]":
            return
        if buf[pos] == ",":
            pos += 1
            skip_ws()
        while True:
            try:
                item, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError:
                if eof:
                    raise ValueError("export JSON is truncated or malformed") from None
                fill()
        pos = end
        yield item


# -- rows --------------------------------------------------------------------------------------
@dataclass
class ParsedExport:
    rows: list[SftRow] = field(default_factory=list)
    exclusions: list[Exclusion] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # tasks, annotations, excluded:<reason>...
    #: task id -> every pair of its annotators' responses (tasks with 2+ annotators only), from
    #: all its usable annotations, not only the picked ones: what annotator agreement is made of.
    agreement: dict[int, list[edits.Pair]] = field(default_factory=dict)
    #: annotation id -> Label Studio's ``lead_time`` (seconds in the editor; None when it has
    #: none, as an API-made annotation) of every row: what draft return is made of
    #: (``draft_return.py``), kept beside the rows, not in them (not training data).
    lead_times: dict[int, float | None] = field(default_factory=dict)

    def merge(self, other: ParsedExport) -> None:
        self.rows.extend(other.rows)
        self.exclusions.extend(other.exclusions)
        self.counts.update(other.counts)
        self.agreement.update(other.agreement)
        self.lead_times.update(other.lead_times)


def _exclusion(reason: str, task: dict, ann: dict | None, detail: str = "") -> Exclusion:
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    prompt = data.get(PROMPT_NAME)
    return {
        "stage": "export",
        "reason": reason,
        "detail": detail,
        "task_id": task.get("id"),
        "annotation_id": (ann or {}).get("id"),
        "prompt": prompt if isinstance(prompt, str) else None,
        "completion": None,
    }


def _response(ann: dict, response_name: str) -> tuple[str | None, str]:
    """The annotation's response text, or (None, reason) when it has none we can use."""
    result = ann.get("result")
    if not isinstance(result, list):
        return None, "malformed_result"
    other_reason = "no_response"
    for item in result:
        if not isinstance(item, dict):
            other_reason = "malformed_result"
            continue
        if item.get("from_name") != response_name:
            other_reason = "unknown_from_name"
            continue
        if item.get("type") != "textarea":
            other_reason = "wrong_result_type"
            continue
        text = (item.get("value") or {}).get("text")
        if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
            return None, "malformed_text"
        return "\n".join(text), ""
    return None, other_reason


def _annotator(ann: dict) -> str:
    """Who made the annotation, for agreement pairs: the user id (snapshots give the id; the
    tasks API an object holding it)."""
    completed_by = ann.get("completed_by")
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("id")
    return "" if completed_by is None else str(completed_by)


def _model_drafts(task: dict, response_name: str) -> dict[int, tuple[str, str | None]]:
    """The task's predictions by id: (model_version, response text or None). Empty when the
    snapshot listed only their ids (made without ``edits.EXPORT_SERIALIZATION``)."""
    found: dict[int, tuple[str, str | None]] = {}
    for pred in task.get("predictions") or []:
        if isinstance(pred, dict) and isinstance(pred.get("id"), int):
            found[pred["id"]] = (str(pred.get("model_version") or ""),
                                 _response(pred, response_name)[0])
    return found


def _row_draft(out: ParsedExport, model_drafts: dict[int, tuple[str, str | None]], ann: dict,
               text: str) -> edits.DraftFields:
    """The draft columns of the row of ``ann`` (counted in ``out``)."""
    parent = ann.get("parent_prediction")
    draft = model_drafts.get(parent) if isinstance(parent, int) else None
    if parent and draft is None:
        out.counts["model_draft_missing"] += 1  # not in the export: deleted, or ids only
    fields = edits.draft_fields(draft, text)
    if draft is not None:
        out.counts["rows_with_model_draft"] += 1
        out.counts["rows_model_draft_unchanged"] += bool(fields["draft_unchanged"])
    return fields


def _pick(candidates: list[tuple[dict, str]], policy: AnnotationPolicy) -> list[tuple[dict, str]]:
    if policy == "all" or len(candidates) <= 1:
        return candidates

    def recency(c: tuple[dict, str]) -> tuple[str, int]:
        ann = c[0]
        return (str(ann.get("updated_at") or ann.get("created_at") or ""), int(ann.get("id") or 0))

    if policy == "ground_truth_first":
        gt = [c for c in candidates if c[0].get("ground_truth")]
        if gt:
            return [max(gt, key=recency)]
    return [max(candidates, key=recency)]


def task_rows(
    task: Any,
    policy: AnnotationPolicy = "latest",
    response_name: str = RESPONSE_NAME,
    prompt_name: str = PROMPT_NAME,
) -> ParsedExport:
    """The rows of one exported task under ``policy``, plus what was excluded and why."""
    out = ParsedExport()
    out.counts["tasks"] += 1
    if not isinstance(task, dict):
        out.counts["excluded:malformed_task"] += 1
        out.exclusions.append({"stage": "export", "reason": "malformed_task", "detail": "",
                               "task_id": None, "annotation_id": None, "prompt": None,
                               "completion": None})
        return out
    annotations = task.get("annotations") or []
    drafts = task.get("drafts") or []
    out.counts["drafts_ignored"] += len(drafts) if isinstance(drafts, list) else 0
    if not isinstance(annotations, list):
        out.counts["excluded:malformed_annotations"] += 1
        out.exclusions.append(_exclusion("malformed_annotations", task, None))
        return out
    data = task.get("data")
    prompt = data.get(prompt_name) if isinstance(data, dict) else None
    if not isinstance(prompt, str):
        out.counts["annotations"] += len(annotations)
        if annotations:
            out.counts["excluded:missing_prompt"] += 1
            out.exclusions.append(_exclusion("missing_prompt", task, None,
                                             f"data.{prompt_name} absent or not text"))
        return out
    if not annotations:
        out.counts["tasks_without_annotations"] += 1
        return out
    candidates: list[tuple[dict, str]] = []
    for ann in annotations:
        out.counts["annotations"] += 1
        if not isinstance(ann, dict):
            out.counts["excluded:malformed_annotation"] += 1
            out.exclusions.append(_exclusion("malformed_annotation", task, None))
            continue
        if ann.get("was_cancelled"):
            out.counts["cancelled"] += 1  # skipped by the annotator: not data, not an error
            continue
        text, reason = _response(ann, response_name)
        if text is None:
            out.counts[f"excluded:{reason}"] += 1
            out.exclusions.append(_exclusion(reason, task, ann))
            continue
        candidates.append((ann, text))
    picked = _pick(candidates, policy)
    out.counts["superseded_annotations"] += len(candidates) - len(picked)
    # The id of the text the task holds now, never the one stored in its data: ingest's
    # prompt_id is of the text it imported, and an edit in Label Studio leaves it behind (two
    # prompts would share an id, the same prompt have two). Unedited, they are the same.
    pid = compute_prompt_id(prompt)
    if len(candidates) > 1 and (pairs := edits.task_pairs(
            [(_annotator(ann), text) for ann, text in candidates])):
        out.agreement[int(task.get("id") or 0)] = pairs
    model_drafts = (_model_drafts(task, response_name)
                    if any(ann.get("parent_prediction") for ann, _ in picked) else {})
    for ann, text in picked:
        completed_by = ann.get("completed_by")
        if isinstance(completed_by, dict):  # the tasks API expands it; snapshots give the id
            completed_by = completed_by.get("id")
        out.rows.append(SftRow(
            prompt=prompt,
            completion=text,
            prompt_id=pid,
            task_id=int(task.get("id") or 0),
            annotation_id=int(ann.get("id") or 0),
            annotator="" if completed_by is None else str(completed_by),
            updated_at=ls_time(ann.get("updated_at") or ann.get("created_at")),
            ground_truth=bool(ann.get("ground_truth")),
            **_row_draft(out, model_drafts, ann, text),
        ))
        out.lead_times[out.rows[-1]["annotation_id"]] = lead_time(ann.get("lead_time"))
    out.counts["rows"] += len(picked)
    return out


def parse_tasks(
    tasks: Iterable[Any], policy: AnnotationPolicy = "latest", response_name: str = RESPONSE_NAME
) -> ParsedExport:
    out = ParsedExport()
    for task in tasks:
        out.merge(task_rows(task, policy, response_name))
    return out


def parse_export_file(
    path: Path, policy: AnnotationPolicy = "latest", response_name: str = RESPONSE_NAME
) -> ParsedExport:
    """Parse a downloaded JSON export, streaming. A file that is not a JSON array is an error
    naming the file; malformed tasks inside it are counted and excluded."""
    try:
        with Path(path).open("rb") as fp:
            return parse_tasks(iter_json_array(fp), policy, response_name)
    except ValueError as err:
        raise SftflowError(f"Label Studio export {path}: {err}") from err


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
create_snapshot_task = io_task(name="create-export-snapshot", retries=0)(create_snapshot)  # one deadline: the retries are below
download_snapshot_task = io_task(name="download-export-snapshot")(download_snapshot)
parse_export_file_task = compute_task(name="parse-export")(parse_export_file)
