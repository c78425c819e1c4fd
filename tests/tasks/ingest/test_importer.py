"""One run's batching and settling against the real SeaweedFS and a real Label Studio project,
without Prefect (the import is called directly): what the ledger holds when, and what the
totals say."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sftflow.tasks.adapters.s3 import ObjectInfo
from sftflow.tasks.ingest.importer import ProjectImporter, rejected_lines, task_data
from sftflow.tasks.ingest.imports import import_batch
from sftflow.tasks.ingest.intake import FileIntake
from sftflow.tasks.ingest.ledger import Ledger
from sftflow.tasks.ingest.prompts import Prompt, prompt_id


class Recorder:
    """The real import, called in this process; records each batch as it is sent, and whether
    its pending marker was in the ledger by then."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.sent: list[tuple[str, int, bool]] = []

    def __call__(self, client, project_id, batch, tasks, **options):
        marker = self.ledger.s3.head(f"{self.ledger.root}/pending/{batch}.json",
                                     bucket=self.ledger.bucket)
        self.sent.append((batch, len(tasks), marker is not None))
        result = import_batch(client, project_id, batch, tasks, **options)
        return SimpleNamespace(result=lambda: result)


def prompts(*texts: str) -> list[Prompt]:
    return [Prompt(t, prompt_id(t), row) for row, t in enumerate(texts, 1)]


def test_task_data_and_quarantine_lines():
    p = Prompt("Hi", prompt_id("Hi"), 3, {"lang": "en"})
    data = task_data(p, ObjectInfo("in/a.jsonl", '"abc"', 5), "s3://b/in/a.jsonl", "run-00000")
    assert data == {"prompt": "Hi", "prompt_id": prompt_id("hi"), "source": "s3://b/in/a.jsonl",
                    "source_etag": "abc", "source_row": 3, "ingest_batch": "run-00000", "lang": "en"}
    line = rejected_lines([({"prompt": "é"}, "rejected_by_labelstudio: 400")]).decode()
    assert line == '{"reason": "rejected_by_labelstudio: 400", "task": {"prompt": "é"}}\n'


@pytest.mark.integration
def test_objects_are_marked_processed_only_once_their_batches_are_confirmed(
    s3, labelstudio, project
):
    ledger = Ledger(s3, s3.bucket, "_sftflow", project.id)
    lsc = Recorder(ledger)
    importer = ProjectImporter(labelstudio, ledger, state_prefix="_sftflow", batch_size=2,
                               submit=lsc)
    importer.open(str(project.created_at))
    a, b = ObjectInfo("in/a.jsonl", '"ea"', 1), ObjectInfo("in/b.jsonl", '"eb"', 1)

    dup = importer.add_file(a, "s3://b/in/a.jsonl",
                            FileIntake(prompts("one", "two", "ONE", "three"), [], None, True))
    assert dup == 1 and len(lsc.sent) == 1 and lsc.sent[0][1:] == (2, True)
    assert ledger.processed_objects() == {}  # "three" is still waiting for its batch

    assert importer.add_file(b, "s3://b/in/b.jsonl",
                             FileIntake(prompts("four"), [], None, True)) == 0
    assert len(lsc.sent) == 2 and not ledger.processed_objects()  # batch 1 holds a's last prompt
    totals = importer.finish()

    assert [batch.rsplit("-", 1)[1] for batch, _, _ in lsc.sent] == ["00000", "00001"]
    assert (totals.batches, totals.requests, totals.imported, totals.quarantined) == (2, 2, 4, 0)
    assert (totals.task_number, totals.verified, totals.full_scans) == (4, True, 0)
    state = ledger.load(str(project.created_at))
    assert state.ids == {prompt_id(t) for t in ("one", "two", "three", "four")}
    assert state.pending == [] and state.expected_tasks == 4 and len(state.segment_keys) == 2
    processed = ledger.processed_objects()
    assert len(processed) == 2
    summary_key = next(o.key for o in s3.list("_sftflow/") if "/objects/" in o.key
                       and o.key.endswith("/ea"))
    summary = json.loads(s3.get_bytes(summary_key)[0])
    assert {k: summary[k] for k in ("records", "new", "duplicate", "problem")} == {
        "records": 4, "new": 3, "duplicate": 1, "problem": None}
    in_project = sorted(t.data["prompt"] for t in labelstudio.tasks.list(project=project.id))
    assert in_project == ["four", "one", "three", "two"]


@pytest.mark.integration
def test_an_incomplete_file_is_not_marked_and_a_left_over_pending_marker_is_dropped(
    s3, labelstudio, project
):
    ledger = Ledger(s3, s3.bucket, "_sftflow", project.id)
    ledger.load(str(project.created_at))
    labelstudio.projects.import_tasks(id=project.id, request=[
        {"prompt": "x", "prompt_id": prompt_id("x"), "ingest_batch": "old-00000"}])
    ledger.confirm("old-00000", [prompt_id("x")], 1)
    ledger.mark_pending("old-00000", 1)  # a crash between confirm and dropping the marker
    importer = ProjectImporter(labelstudio, ledger, state_prefix="_sftflow", batch_size=10,
                               submit=Recorder(ledger))
    importer.open(str(project.created_at))
    assert importer.known == {prompt_id("x")} and importer.totals.recovered_batches == 0
    importer.add_file(ObjectInfo("in/a.jsonl", '"e"', 1), "s3://b/in/a.jsonl",
                      FileIntake(prompts("x", "y"), [], None, complete=False))
    totals = importer.finish()
    assert (totals.imported, totals.task_number, totals.verified) == (1, 2, True)
    assert ledger.processed_objects() == {}
    assert ledger.load(str(project.created_at)).pending == []
