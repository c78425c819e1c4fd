"""What an ingest run takes in: which source objects are new, and how much of each file counts.

Pure functions over a listing and parsed files (no services, no Prefect):

- ``select_objects``: the objects under the source prefix, minus ingest's own state and those
  the ledger already processed with the same ETag, at most ``max_files`` of them;
- ``IntakeTally.take``: one parsed file, cut so the run stays within ``max_records``, counted
  (records, rejected records and their reasons, quarantined files);
- ``new_prompts``: the prompts whose ``prompt_id`` is not known yet (the per-file dedupe).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sftflow.tasks.adapters.s3 import ObjectInfo
from sftflow.tasks.ingest.ledger import Ledger
from sftflow.tasks.ingest.parse import FileProblem, ParsedFile
from sftflow.tasks.ingest.prompts import Prompt, Rejected


@dataclass
class Selection:
    """The source objects of one run."""

    todo: list[ObjectInfo] = field(default_factory=list)  # new or changed, in listing order
    listed: int = 0  # source objects under the prefix (ingest's own state excluded)
    unchanged: int = 0  # processed before with the same ETag: not read again


def select_objects(
    objects: Iterable[ObjectInfo],
    processed: dict[str, set[str]],
    state_prefix: str,
    max_files: int | None = None,
) -> Selection:
    """Split a listing into unchanged objects and those to read (``processed`` as returned by
    ``Ledger.processed_objects``). Folder markers and ``<state_prefix>/`` are not sources."""
    own_state = state_prefix.strip("/") + "/"
    selection = Selection()
    for obj in objects:
        if obj.key.startswith(own_state) or obj.key.endswith("/"):
            continue
        selection.listed += 1
        if Ledger.is_processed(processed, obj):
            selection.unchanged += 1
        elif max_files is None or len(selection.todo) < max_files:
            selection.todo.append(obj)
    return selection


@dataclass
class FileIntake:
    """The records of one file that this run takes."""

    prompts: list[Prompt]
    rejected: list[Rejected]
    problem: FileProblem | None
    complete: bool  # False: cut short by max_records; the object is left for the next run

    @property
    def records(self) -> int:
        return len(self.prompts) + len(self.rejected)

    def summary(self, counts: Counter[str]) -> dict[str, Any]:
        """What the ledger records for the processed object; ``counts`` holds its prompts'
        ``new`` / ``duplicate`` counts (as ``new_prompts`` left them)."""
        return {"records": self.records, "quarantined": len(self.rejected), **counts,
                "problem": self.problem.reason if self.problem else None}


def cut_file(parsed: ParsedFile, room: int | None) -> FileIntake:
    """The file's first ``room`` records in row order (all of them when ``room`` is None or
    enough); a cut file is not ``complete``."""
    if room is None or parsed.records <= room:
        return FileIntake(parsed.prompts, parsed.rejected, parsed.problem, complete=True)
    rows = sorted([p.row for p in parsed.prompts] + [r.row for r in parsed.rejected])
    last = rows[room - 1] if room > 0 else 0
    return FileIntake([p for p in parsed.prompts if p.row <= last],
                      [r for r in parsed.rejected if r.row <= last], parsed.problem, complete=False)


@dataclass
class IntakeTally:
    """What a run read, file by file. ``duplicate`` is added by whoever dedupes the prompts."""

    files_read: int = 0
    files_failed: int = 0  # unreadable after retries (e.g. access denied); left for the next run
    files_quarantined: int = 0
    records: int = 0
    duplicate: int = 0
    quarantined: int = 0  # rejected records
    reasons: Counter[str] = field(default_factory=Counter)  # file-level ones as "file:<reason>"

    def take(self, parsed: ParsedFile, max_records: int | None = None) -> FileIntake:
        """Count one read file, cut so that the run's records stay within ``max_records``."""
        intake = cut_file(parsed, None if max_records is None else max_records - self.records)
        self.files_read += 1
        self.records += intake.records
        self.quarantined += len(intake.rejected)
        self.reasons.update(r.reason for r in intake.rejected)
        if intake.problem is not None:
            self.files_quarantined += 1
            self.reasons[f"file:{intake.problem.reason}"] += 1
        return intake


def new_prompts(prompts: Iterable[Prompt], known: set[str], counts: Counter[str]) -> Iterator[Prompt]:
    """The prompts whose id is not in ``known``, lazily: each id joins ``known`` as its prompt
    is yielded (so a later copy in the same file is a duplicate), and ``counts`` gets one
    ``new`` or ``duplicate`` per prompt. Being lazy, an id the consumer drops from ``known``
    meanwhile (a task Label Studio refused) counts as new again."""
    for p in prompts:
        if p.prompt_id in known:
            counts["duplicate"] += 1
            continue
        known.add(p.prompt_id)
        counts["new"] += 1
        yield p
