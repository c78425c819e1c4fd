"""One ingest run's imports into one Label Studio project: batching, settling and the ledger.

``ProjectImporter`` holds the run's state against the project and its ``Ledger``:

- ``open()`` loads the ledger and awaits the batches an interrupted run left pending until their
  requests have certainly ended (``imports.await_outcome``); what of each landed becomes its
  segment. If the project's task count then differs from what the
  ledger expects, the project is rescanned: its prompt_ids become the ledger's snapshot and
  unannotated duplicate tasks are removed.
- ``add_file()`` queues a file's prompts whose id is not known yet, in batches of
  ``batch_size``. A full batch is marked pending in the ledger and submitted (``import_batch``)
  while the next one is read: one batch in flight. Before the next is sent, the one in flight
  is settled: its landed prompt_ids become a segment, tasks Label Studio refused go to
  ``quarantine/rejected/<batch>.jsonl`` (their ids are no longer known), and the source objects
  whose prompts were all in it or earlier are marked processed.
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
from typing import Any

from label_studio_sdk import LabelStudio

from sftflow.core.clock import utc_now
from sftflow.core.failpoints import failpoint
from sftflow.tasks.intake import FileIntake, new_prompts
from sftflow.tasks.labelstudio.imports import (
    BatchResult,
    await_outcome,
    import_batch,
    remove_unannotated,
    scan_project_task,
    task_count,
)
from sftflow.tasks.progress import PhaseTimer
from sftflow.tasks.prompts import Ledger, Prompt, prompt_id, rejected_batch_key
from sftflow.tasks.storage import ObjectInfo


def task_data(p: Prompt, obj: ObjectInfo, uri: str, batch: str) -> dict[str, Any]:
    """The Label Studio task data of one prompt from source object ``obj`` (at ``uri``)."""
    data = {"prompt": p.prompt, "prompt_id": p.prompt_id, "source": uri,
            "source_etag": obj.etag.strip('"'), "source_row": p.row, "ingest_batch": batch}
    if p.extra:
        data.update(p.extra)
    return data


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
    reconciled: int = 0  # prompts found already landed when a batch was retried or recovered
    recovered_batches: int = 0  # pending batches of an earlier, interrupted run
    full_scans: int = 0
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
    ):
        """``submit(client, project_id, batch, tasks, timeout_s=..., doubt_s=...)`` returns a
        future of a ``BatchResult``; by default ``import_batch.submit``. ``doubt_s``: how long an
        import request may live on the server (see ``imports.await_outcome``)."""
        self.client, self.ledger, self.project_id = client, ledger, ledger.project_id
        self.state_prefix, self.batch_size, self.timeout_s = state_prefix, batch_size, timeout_s
        self.doubt_s = doubt_s
        self.timer = timer or PhaseTimer()
        self.log = logger or logging.getLogger(__name__)
        self._submit = submit or import_batch.submit
        self.totals = ImportTotals()
        self.known: set[str] = set()  # prompt_ids in the project or on their way there
        self.expected = 0  # the project's task count once every confirmed batch is in
        self._count_at_start = 0
        self._run_tag = uuid.uuid4().hex[:12]
        self._batch = ""
        self._buffer: list[dict[str, Any]] = []
        self._read: list[tuple[ObjectInfo, dict[str, Any]]] = []  # complete since the last submit
        self._in_flight: _InFlight | None = None

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
        for p in new_prompts(intake.prompts, self.known, counts):
            if not self._buffer:
                self._batch = f"{self._run_tag}-{self.totals.batches:05d}"
            self._buffer.append(task_data(p, obj, uri, self._batch))
            if len(self._buffer) >= self.batch_size:
                self._flush()
        if intake.complete:
            self._read.append((obj, intake.summary(counts)))
        return counts["duplicate"]

    def _flush(self) -> None:
        """Settle the batch in flight, then submit the buffer (or, if it is empty, mark the
        objects read since the last submit)."""
        if self._in_flight is not None:
            self._settle(self._in_flight)
            self._in_flight = None
        if not self._buffer:
            for obj, summary in self._read:
                self.ledger.mark_object(obj, summary)
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
            self.ledger.mark_object(obj, summary)

    # -- end ------------------------------------------------------------------------------------
    def finish(self) -> ImportTotals:
        """Send and settle what is left, then check that the project holds what the ledger
        expects (rescan and repair if not)."""
        self._flush()
        self._flush()  # settles the last batch in flight and marks the objects read after it
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
        """Read the project once, drop unannotated duplicate tasks, make that the ledger."""
        scan = scan_project_task(self.client, self.project_id, prompt_id)
        self.totals.full_scans += 1
        if scan.duplicates:
            self.totals.duplicates_removed += len(remove_unannotated(self.client, scan.duplicates))
        self.ledger.write_snapshot(scan.ids, task_count(self.client, self.project_id), superseded)
        return scan.ids
