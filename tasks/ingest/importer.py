"""One ingest run's imports into one Label Studio project: batching, settling and the ledger.

``ProjectImporter`` holds the run's state against the project and its ``Ledger``:

- ``open()`` loads the ledger and awaits the batches an interrupted run left pending until their
  requests have certainly ended (``imports.await_outcome``); what of each landed becomes its
  segment. If the project's task count then differs from what the
  ledger expects, the project is rescanned: its prompt_ids become the ledger's snapshot and
  duplicate tasks are removed (``remove_duplicates``): of the tasks holding one prompt, the
  one kept is the first with work on it (an annotation, a skip, a prediction such as a model
  draft, an annotator's draft), else the first; the others go only if they were made by
  ingest and hold no work, which Label Studio checks in the delete request itself.
- ``add_file()`` quarantines a file's new prompts that near-duplicate a prompt of the project or
  an earlier one of the run (``near_duplicate_prompt``, when ``near_duplicates`` is given;
  ``tasks.ingest.index``), then queues the prompts whose id is not known yet, in batches of
  ``batch_size`` (the first of ``FIRST_BATCH``). A full batch is marked pending in the ledger
  and submitted (``import_batch``) while the next one is read: one batch in flight. Before the
  next is sent, the one in flight is settled: its landed prompt_ids become a segment, then their
  signatures (with the task ids from the import's answer) a segment of the signature index;
  tasks Label Studio refused go to ``quarantine/rejected/<batch>.jsonl`` (their ids are no
  longer known), and the source objects whose prompts were all in it or earlier are marked
  processed, each after its near-duplicates' quarantine records (with the
  existing task's id) are written.

A prompt whose id is already in the project is a duplicate, never a near-duplicate: so a rerun
after a crash between an import and its index segment does not quarantine what was imported.
The index is loaded when the first file comes, and rebuilt from the project's tasks when its
prompt_ids differ from the ledger's.
- ``finish()`` sends and settles what is left and checks the project's task count against the
  ledger once more (rescanning as above if they differ). Its ``ImportTotals`` go into the
  run's report.

Time spent waiting on imports and verifying is added to the ``PhaseTimer`` phases
``import_wait`` and ``verify``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect.utilities.annotations import quote

from sftflow.core.clock import utc_now
from sftflow.core.failpoints import failpoint
from sftflow.tasks.adapters.s3 import ObjectInfo
from sftflow.tasks.dedup import DedupConfig, fingerprint
from sftflow.tasks.ingest.imports import (
    BatchResult,
    await_outcome,
    import_batch_task,
    iter_project_tasks,
    scan_project_task,
    task_count,
)
from sftflow.tasks.ingest.index import (
    Match,
    SignatureIndex,
    load_index,
    near_duplicate_key,
    save_segment,
    save_snapshot,
)
from sftflow.tasks.ingest.intake import FileIntake, new_prompts
from sftflow.tasks.ingest.ledger import Ledger, rejected_batch_key
from sftflow.tasks.ingest.prompts import Prompt, prompt_id
from sftflow.tasks.runtime.progress import PhaseTimer

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio


def _submit_import(client: LabelStudio, project_id: int, batch: str, tasks: list[dict[str, Any]],
                   **options: Any) -> Any:
    """``import_batch_task.submit``, its task dicts quoted: Prefect would otherwise walk every
    value of the batch twice (the task run's inputs, then its parameters) before the task runs,
    about 15 % of an ingest's time at 10,000 tasks a batch (py-spy, bench/ingest.py's corpus)."""
    return import_batch_task.submit(client, project_id, batch, quote(tasks), **options)


def task_data(p: Prompt, obj: ObjectInfo, uri: str, batch: str) -> dict[str, Any]:
    """The Label Studio task data of one prompt from source object ``obj`` (at ``uri``)."""
    data = {"prompt": p.prompt, "prompt_id": p.prompt_id, "source": uri,
            "source_etag": obj.etag.strip('"'), "source_row": p.row, "ingest_batch": batch}
    if p.extra:
        data.update(p.extra)
    return data


#: The run's first batch is sent at this size (or ``batch_size`` if smaller): Label Studio starts
#: importing while the rest is read, instead of idling until a full batch is (bench/ingest.py:
#: reading 10,000 prompts takes about 2 s, the import is the longer step).
FIRST_BATCH = 1_000
#: Groups of duplicate tasks re-read, then deleted, per request of a rescan.
REMOVE_BATCH = 200  # up to ~400 task ids in one read's query string: under 8 KB
#: Tasks that hold no work: no annotation, no skip, no prediction, no annotator's draft. The
#: Data Manager computes these fields from the annotation, prediction and draft tables when it
#: runs the request; the task's stored counters (``total_annotations``, ``total_predictions``)
#: are not used: on PostgreSQL, Label Studio 1.23 leaves them at 0 after an annotation or a
#: prediction is created through the API.
_NO_WORK = {"conjunction": "and", "items": [
    {"filter": f"filter:tasks:{name}", "operator": "empty", "type": "List", "value": True}
    for name in ("annotations_ids", "predictions_model_versions")
] + [{"filter": "filter:tasks:draft_exists", "operator": "equal", "type": "Boolean",
      "value": False}]}
_WORK_FIELDS = "id,data,annotations_ids,predictions_model_versions,draft_exists"


def _worked_on(task: Any) -> bool:
    """Whether the task holds an annotation (a skip included), a prediction or a draft."""
    return bool(getattr(task, "annotations_ids", None)
                or getattr(task, "predictions_model_versions", None)
                or getattr(task, "draft_exists", False))


def _read_tasks(client: LabelStudio, project_id: int, ids: list[int]) -> dict[int, Any]:
    """The tasks ``ids`` of the project that still exist, read now, with their work counts."""
    query = json.dumps({"selectedItems": {"all": False, "included": ids}})
    pager = client.tasks.list(project=project_id, query=query, fields="all",
                              include=_WORK_FIELDS, page_size=max(len(ids), 1))
    return {int(t.id): t for t in pager}


def _surplus(tasks: list[Any]) -> list[int]:
    """Of the tasks holding one prompt (ascending ids): those to delete. The one kept is the
    first with work on it, else the first; a task with work, or not made by ingest, stays."""
    if len(tasks) < 2:
        return []
    keep = next((t for t in tasks if _worked_on(t)), tasks[0])
    return [int(t.id) for t in tasks if t is not keep and not _worked_on(t)
            and (t.data or {}).get("ingest_batch")]


def remove_duplicates(client: LabelStudio, project_id: int, groups: list[list[int]],
                      *, batch: int = REMOVE_BATCH) -> list[int]:
    """Reduce each group of task ids holding one prompt to the tasks to keep (``_surplus``);
    returns the ids deleted. Per ``batch`` groups the tasks are read again just before their
    delete, and the delete itself is conditional: Label Studio deletes only those that hold no
    work when it runs it (Data Manager filters), so work added after the read is never lost."""
    deleted: list[int] = []
    groups = sorted(groups)
    for start in range(0, len(groups), batch):
        chunk = groups[start:start + batch]
        fresh = _read_tasks(client, project_id, [t for g in chunk for t in g])
        doomed = [t for g in chunk for t in _surplus([fresh[i] for i in g if i in fresh])]
        if not doomed:
            continue
        client.actions.create(id="delete_tasks", project=project_id, filters=_NO_WORK,
                              selected_items={"all": False, "included": doomed})
        left = _read_tasks(client, project_id, doomed)  # gained work since the read: kept
        deleted += [t for t in doomed if t not in left]
    return deleted


def rejected_lines(rejected: list[tuple[dict[str, Any], str]]) -> bytes:
    """The quarantine JSONL of refused tasks: one ``{"reason", "task"}`` per line."""
    return "".join(json.dumps({"reason": why, "task": task}, ensure_ascii=False) + "\n"
                   for task, why in rejected).encode()


@dataclass
class ImportTotals:
    """What the imports of one run did to the project."""

    batches: int = 0  # batches submitted
    requests: int = 0  # import requests (a batch with refused tasks takes several)
    imported: int = 0
    quarantined: int = 0  # tasks Label Studio refused
    reasons: Counter[str] = field(default_factory=Counter)
    #: prompts found already landed: after a 5xx, a timeout or a lost answer, or when a batch
    #: was retried or recovered (never sent twice)
    reconciled: int = 0
    recovered_batches: int = 0  # pending batches of an earlier, interrupted run
    full_scans: int = 0
    index_rebuilds: int = 0  # signature index rebuilt from the project (missing or stale)
    duplicates_removed: int = 0
    task_number: int = 0  # the project's task count at the end
    verified: bool = False  # that count matched the ledger at the end (else: rescanned)


@dataclass
class _InFlight:
    future: Any  # a PrefectFuture of BatchResult
    objects: list[tuple[ObjectInfo, dict[str, Any]]]  # processed once the batch is confirmed


class ProjectImporter:
    def __init__(
        self,
        client: LabelStudio,
        ledger: Ledger,
        *,
        state_prefix: str,
        batch_size: int,
        timeout_s: float | None = None,
        doubt_s: float = 300.0,
        timer: PhaseTimer | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        submit: Callable[..., Any] | None = None,
        near_duplicates: DedupConfig | None = None,
    ):
        """``submit(client, project_id, batch, tasks, timeout_s=..., doubt_s=...)`` returns a
        future of a ``BatchResult``; by default ``import_batch.submit``. ``doubt_s``: how long an
        import request may live on the server (see ``imports.await_outcome``).
        ``near_duplicates``: how prompts are compared (``prompt_index.prompt_config``); None
        imports near-duplicates like any other prompt."""
        self.client, self.ledger, self.project_id = client, ledger, ledger.project_id
        self.state_prefix, self.batch_size, self.timeout_s = state_prefix, batch_size, timeout_s
        self.doubt_s = doubt_s
        self.timer = timer or PhaseTimer()
        self.log = logger or logging.getLogger(__name__)
        self._submit = submit or _submit_import
        self.totals = ImportTotals()
        self.known: set[str] = set()  # prompt_ids in the project or on their way there
        self.expected = 0  # the project's task count once every confirmed batch is in
        self._count_at_start = 0
        self._run_tag = uuid.uuid4().hex[:12]
        self._batch = ""
        self._buffer: list[dict[str, Any]] = []
        self._read: list[tuple[ObjectInfo, dict[str, Any]]] = []  # complete since the last submit
        self._in_flight: _InFlight | None = None
        self.near_cfg = near_duplicates
        self._index: SignatureIndex | None = None
        self._near: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (key, etag) -> records

    # -- start ----------------------------------------------------------------------------------
    def open(self, project_created_at: str) -> None:
        """What the project holds already: the ledger, its pending batches, then a count check."""
        state = self.ledger.load(project_created_at)
        for batch in state.pending:
            if self.ledger.segment_key(batch) in state.segment_keys:  # confirmed, marker left over
                self.ledger.drop_pending(batch)
                continue
            there = self._await_pending(batch)
            state.segment_keys.append(self.ledger.confirm(batch, there, sum(there.values())))
            state.ids.update(there)
            state.expected_tasks += sum(there.values())
            self.totals.recovered_batches += 1
            self.totals.reconciled += len(there)
        self.known, self.expected = state.ids, state.expected_tasks
        self._count_at_start = task_count(self.client, self.project_id)
        if self._count_at_start != self.expected:
            self.log.info("ledger and project disagree: reading the project's prompt_ids")
            self.known = self._rescan(state.segment_keys)
            self.expected = self._count_at_start = task_count(self.client, self.project_id)

    def _await_pending(self, batch: str) -> Counter[str]:
        """What of a batch an interrupted run sent has landed, once its request certainly
        ended: all its tasks found, or ``doubt_s`` past the time its marker was written."""
        marker = self.ledger.pending_marker(batch)
        age_s = (utc_now() - marker.at).total_seconds()
        return await_outcome(self.client, self.project_id, batch,
                             lambda there: sum(there.values()) >= marker.tasks,
                             sent_at=time.monotonic() - age_s, doubt_s=self.doubt_s)

    # -- during the run -------------------------------------------------------------------------
    def add_file(self, obj: ObjectInfo, uri: str, intake: FileIntake) -> int:
        """Queue the file's new prompts; returns how many were duplicates. A complete file is
        marked processed once the batches holding its prompts are confirmed."""
        counts: Counter[str] = Counter()
        prompts, index = intake.prompts, None
        if self.near_cfg is not None:
            prompts, sigs = self._stop_near_duplicates(obj, uri, prompts, counts)
            index = self._index
            if sigs:  # in the index before any of them is sent: a batch's segment holds them all
                index.add(list(sigs), np.stack(list(sigs.values())))
        for p in new_prompts(prompts, self.known, counts):
            if not self._buffer:
                self._batch = f"{self._run_tag}-{self.totals.batches:05d}"
            self._buffer.append(task_data(p, obj, uri, self._batch))
            if index is not None and (row := index.row(p.prompt_id)) is not None:
                index.batches[row] = self._batch
            if len(self._buffer) >= (self.batch_size if self.totals.batches
                                     else min(self.batch_size, FIRST_BATCH)):
                self._flush()
        if intake.complete:
            self._read.append((obj, intake.summary(counts)))
        return counts["duplicate"]

    def _stop_near_duplicates(self, obj: ObjectInfo, uri: str, prompts: list[Prompt],
                              counts: Counter[str]) -> tuple[list[Prompt], dict[str, np.ndarray]]:
        """The file's prompts less the near-duplicates of the project's or the run's earlier
        prompts (queued for quarantine), and the signatures of the new ones by prompt_id."""
        index = self._load_index()
        first: dict[str, Prompt] = {}
        for p in prompts:  # new ids only: one already in the project is a duplicate, not near
            if p.prompt_id not in self.known and p.prompt_id not in first:
                first[p.prompt_id] = p
        if not first:
            return prompts, {}
        cand = list(first.values())
        fp = fingerprint([p.prompt for p in cand], index.cfg).sigs
        matches = index.check([p.prompt_id for p in cand], fp)
        near = {p.prompt_id: m for p, m in zip(cand, matches, strict=True) if m is not None}
        if near:  # every record of such a prompt (exact copies included) is quarantined
            records = [self._near_record(p, near[p.prompt_id], obj, uri)
                       for p in prompts if p.prompt_id in near]
            self._near.setdefault((obj.key, obj.etag), []).extend(records)
            counts["near_duplicate"] += len(records)
            self.totals.quarantined += len(records)
            self.totals.reasons["near_duplicate_prompt"] += len(records)
        sigs = {p.prompt_id: s for p, s in zip(cand, fp, strict=True) if p.prompt_id not in near}
        return [p for p in prompts if p.prompt_id not in near], sigs

    @staticmethod
    def _near_record(p: Prompt, m: Match, obj: ObjectInfo, uri: str) -> dict[str, Any]:
        return {"reason": "near_duplicate_prompt", "source": uri, "etag": obj.etag, "row": p.row,
                "prompt_id": p.prompt_id, "prompt": p.prompt, "existing_prompt_id": m.prompt_id,
                "existing_task_id": None, "similarity": round(m.similarity, 4)}

    def _load_index(self) -> SignatureIndex:
        """The project's signature index, rebuilt from its tasks when missing or when its
        prompt_ids are not the ledger's (a crash between a ledger write and an index write)."""
        if self._index is not None:
            return self._index
        assert self.near_cfg is not None
        root = self.ledger.root
        index, segments = load_index(self.ledger.s3, self.ledger.bucket, root, self.near_cfg)
        if index is None or set(index.ids) != self.known:
            self.log.info("signature index of project %s missing or stale: rebuilding it",
                          self.project_id)
            index = self._rebuild_index()
            self.totals.index_rebuilds += 1
        elif segments > 32:
            self.ledger.fence()
            save_snapshot(self.ledger.s3, self.ledger.bucket, root, index)
        self._index = index
        return index

    def _rebuild_index(self) -> SignatureIndex:
        ids: dict[str, tuple[int, str, str]] = {}
        for task_id, data in sorted(iter_project_tasks(self.client, self.project_id)):
            text = data.get("prompt")
            if not isinstance(text, str):
                continue
            pid = data.get("prompt_id") or prompt_id(text)
            ids.setdefault(pid, (task_id, text, str(data.get("ingest_batch") or "")))
        assert self.near_cfg is not None
        index = SignatureIndex(self.near_cfg)
        if ids:
            rows = list(ids.values())
            index.add(list(ids), fingerprint([t for _, t, _ in rows], self.near_cfg).sigs,
                      [tid for tid, _, _ in rows], [b for _, _, b in rows])
        self.ledger.fence()
        save_snapshot(self.ledger.s3, self.ledger.bucket, self.ledger.root, index)
        return index

    def _existing_task_ids(self, prompt_ids: set[str]) -> dict[str, int]:
        """Task ids of prompts in the index. Those imported by this run came with the import's
        answer; any still unknown (found landed after a 500 or a doubt) are looked up in Label
        Studio once per batch (their batch is confirmed by now)."""
        index = self._index
        if index is None:
            return {}
        rows = {p: r for p in prompt_ids if (r := index.row(p)) is not None}
        for batch in sorted({index.batches[r] for r in rows.values() if index.task_ids[r] < 0}):
            if not batch:
                continue
            for task_id, data in iter_project_tasks(self.client, self.project_id, batch=batch):
                r = index.row(str(data.get("prompt_id")))
                if r is not None and index.task_ids[r] < 0:
                    index.task_ids[r] = task_id
        return {p: int(index.task_ids[r]) for p, r in rows.items() if index.task_ids[r] >= 0}

    def _write_near(self, obj: ObjectInfo) -> None:
        """The quarantine records of an object's near-duplicates, with the existing task ids."""
        records = self._near.pop((obj.key, obj.etag), None)
        if not records:
            return
        tids = self._existing_task_ids({r["existing_prompt_id"] for r in records})
        for r in records:
            r["existing_task_id"] = tids.get(r["existing_prompt_id"])
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        self.ledger.fence()
        self.ledger.s3.put_bytes(near_duplicate_key(self.state_prefix, obj.key, obj.etag), body,
                                 bucket=self.ledger.bucket, content_type="application/x-ndjson")

    def _mark(self, obj: ObjectInfo, summary: dict[str, Any]) -> None:
        self._write_near(obj)
        self.ledger.mark_object(obj, summary)

    def _flush(self) -> None:
        """Settle the batch in flight, then submit the buffer (or, if it is empty, mark the
        objects read since the last submit)."""
        if self._in_flight is not None:
            self._settle(self._in_flight)
            self._in_flight = None
        if not self._buffer:
            for obj, summary in self._read:
                self._mark(obj, summary)
            self._read = []
            return
        self.ledger.mark_pending(self._batch, len(self._buffer))
        future = self._submit(self.client, self.project_id, self._batch, self._buffer,
                              timeout_s=self.timeout_s, doubt_s=self.doubt_s)
        self.totals.batches += 1
        self._in_flight = _InFlight(future, self._read)
        self._buffer, self._read = [], []

    def _settle(self, in_flight: _InFlight) -> None:
        with self.timer.phase("import_wait"):
            result: BatchResult = in_flight.future.result()
        failpoint("ingest.after-import")
        totals = self.totals
        self.ledger.confirm(result.batch, result.landed, len(result.landed))
        failpoint("ingest.after-confirm")
        if self._index is not None:
            self._index.set_task_ids(result.task_ids)
            self.ledger.fence()
            save_segment(self.ledger.s3, self.ledger.bucket, self.ledger.root, result.batch,
                         self._index, result.landed)
        self.expected += len(result.landed)
        totals.imported += len(result.landed)
        totals.reconciled += result.reconciled
        totals.requests += result.requests
        if result.rejected:
            totals.quarantined += len({t["prompt_id"] for t, _ in result.rejected})
            for task, why in result.rejected:
                totals.reasons[why.split(":", 1)[0]] += 1
                self.known.discard(task["prompt_id"])
            self.ledger.s3.put_bytes(rejected_batch_key(self.state_prefix, result.batch),
                                     rejected_lines(result.rejected), bucket=self.ledger.bucket)
        for obj, summary in in_flight.objects:
            self._mark(obj, summary)

    # -- end ------------------------------------------------------------------------------------
    def finish(self) -> ImportTotals:
        """Send and settle what is left, then check that the project holds what the ledger
        expects (rescan and repair if not)."""
        self._flush()
        self._flush()  # settles the last batch in flight and marks the objects read after it
        for key, etag in list(self._near):  # files cut short by max_records (not marked)
            self._write_near(ObjectInfo(key=key, etag=etag, size=0))
        totals = self.totals
        with self.timer.phase("verify"):
            # Nothing sent: the count read at the start still holds (saves a request on reruns).
            totals.task_number = (task_count(self.client, self.project_id) if totals.batches
                                  else self._count_at_start)
            totals.verified = totals.task_number == self.expected
            if not totals.verified:
                self.log.warning("project has %d tasks, ledger expects %d: rescanning",
                                 totals.task_number, self.expected)
                self._rescan(self.ledger.segment_keys())
                totals.task_number = task_count(self.client, self.project_id)
        return totals

    def _rescan(self, superseded: list[str]) -> set[str]:
        """Read the project once, remove duplicate tasks that hold no work
        (``remove_duplicates``), make that the ledger."""
        scan = scan_project_task(self.client, self.project_id, prompt_id)
        self.totals.full_scans += 1
        if scan.groups:
            removed = remove_duplicates(self.client, self.project_id, list(scan.groups.values()))
            self.totals.duplicates_removed += len(removed)
            if kept := sum(len(g) - 1 for g in scan.groups.values()) - len(removed):
                self.log.info("rescan: %d duplicate task(s) kept for the work on them", kept)
        self.ledger.write_snapshot(scan.ids, task_count(self.client, self.project_id), superseded)
        return scan.ids
