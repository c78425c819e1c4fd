"""One run's batching and settling against an in-memory bucket and a fake project (no services,
no Prefect): what the ledger holds when, what is quarantined, what the totals say."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

from sftflow.tasks.intake import FileIntake
from sftflow.tasks.labelstudio.importer import ProjectImporter, rejected_lines, task_data
from sftflow.tasks.labelstudio.imports import BatchResult
from sftflow.tasks.prompts import Ledger, Prompt, prompt_id
from sftflow.tasks.storage import ObjectInfo, PreconditionFailed


class MemoryS3:
    """The slice of ``S3`` the ledger uses, in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_bytes(self, key, data, *, bucket=None, if_none_match=False, content_type=None):
        if if_none_match and key in self.objects:
            raise PreconditionFailed(bucket, key)
        self.objects[key] = data
        return '"etag"'

    def get_bytes(self, key, *, bucket=None):
        if key not in self.objects:
            raise KeyError(key)
        return self.objects[key], '"etag"'

    def list(self, prefix="", *, bucket=None):
        return [ObjectInfo(k, '"etag"', len(v)) for k, v in sorted(self.objects.items())
                if k.startswith(prefix)]

    def delete(self, keys, *, bucket=None):
        keys = list(keys)
        for k in keys:
            self.objects.pop(k, None)
        return len(keys)

    def uri(self, key, *, bucket=None):
        return f"s3://{bucket}/{key}"


class FakeProject:
    """A project that lands every task but those whose prompt starts with "refuse"."""

    def __init__(self) -> None:
        self.tasks = 0
        self.projects = SimpleNamespace(get=lambda id: SimpleNamespace(task_number=self.tasks))
        self.sent: list[tuple[str, int, bool]] = []  # (batch, tasks, pending marker was written)

    def submit(self, ledger: Ledger):
        def submit(client, project_id, batch, tasks, *, timeout_s=None):
            self.sent.append((batch, len(tasks), f"{ledger.root}/pending/{batch}.json" in ledger.s3.objects))
            ok = [t for t in tasks if not t["prompt"].startswith("refuse")]
            self.tasks += len(ok)
            refused = [(t, "rejected_by_labelstudio: 400 bad") for t in tasks if t not in ok]
            result = BatchResult(batch, [t["prompt_id"] for t in ok], 0, refused, 1)
            return SimpleNamespace(result=lambda: result)
        return submit


def prompts(*texts: str) -> list[Prompt]:
    return [Prompt(t, prompt_id(t), row) for row, t in enumerate(texts, 1)]


def test_task_data_and_quarantine_lines():
    p = Prompt("Hi", prompt_id("Hi"), 3, {"lang": "en"})
    data = task_data(p, ObjectInfo("in/a.jsonl", '"abc"', 5), "s3://b/in/a.jsonl", "run-00000")
    assert data == {"prompt": "Hi", "prompt_id": prompt_id("hi"), "source": "s3://b/in/a.jsonl",
                    "source_etag": "abc", "source_row": 3, "ingest_batch": "run-00000", "lang": "en"}
    line = rejected_lines([({"prompt": "é"}, "rejected_by_labelstudio: 400")]).decode()
    assert line == '{"reason": "rejected_by_labelstudio: 400", "task": {"prompt": "é"}}\n'


def test_objects_are_marked_processed_only_once_their_batches_are_confirmed():
    s3, lsc = MemoryS3(), FakeProject()
    ledger = Ledger(s3, "b", "_sftflow", 5)
    importer = ProjectImporter(lsc, ledger, state_prefix="_sftflow", batch_size=2,
                               submit=lsc.submit(ledger))
    importer.open("2026-01-01")
    a, b = ObjectInfo("in/a.jsonl", '"ea"', 1), ObjectInfo("in/b.jsonl", '"eb"', 1)

    dup = importer.add_file(a, "s3://b/in/a.jsonl",
                            FileIntake(prompts("one", "two", "ONE", "three"), [], None, True))
    assert dup == 1 and len(lsc.sent) == 1 and lsc.sent[0][1:] == (2, True)
    assert ledger.processed_objects() == {}  # "three" is still waiting for its batch

    assert importer.add_file(b, "s3://b/in/b.jsonl",
                             FileIntake(prompts("refuse me"), [], None, True)) == 0
    assert len(lsc.sent) == 2 and not ledger.processed_objects()  # batch 1 holds a's last prompt
    totals = importer.finish()

    assert [batch.rsplit("-", 1)[1] for batch, _, _ in lsc.sent] == ["00000", "00001"]
    assert (totals.batches, totals.requests, totals.imported, totals.quarantined) == (2, 2, 3, 1)
    assert totals.reasons == Counter(rejected_by_labelstudio=1)
    assert (totals.task_number, totals.verified, totals.full_scans) == (3, True, 0)
    state = ledger.load("2026-01-01")
    assert state.ids == {prompt_id(t) for t in ("one", "two", "three")} and state.pending == []
    assert state.expected_tasks == 3 and len(state.segment_keys) == 2
    assert len(ledger.processed_objects()) == 2
    summary = json.loads(s3.objects[next(k for k in s3.objects if "/objects/" in k
                                        and k.endswith("/ea"))])
    assert {k: summary[k] for k in ("records", "new", "duplicate", "problem")} == {
        "records": 4, "new": 3, "duplicate": 1, "problem": None}
    (quarantined,) = [k for k in s3.objects if k.startswith("_sftflow/quarantine/rejected/")]
    assert quarantined == f"_sftflow/quarantine/rejected/{lsc.sent[1][0]}.jsonl"
    assert prompt_id("refuse me") not in importer.known  # may be sent again later


def test_an_incomplete_file_is_not_marked_and_a_left_over_pending_marker_is_dropped():
    s3, lsc = MemoryS3(), FakeProject()
    ledger = Ledger(s3, "b", "_sftflow", 5)
    ledger.load("2026-01-01")
    ledger.confirm("old-00000", [prompt_id("x")], 1)
    ledger.mark_pending("old-00000", 1)  # a crash between confirm and dropping the marker
    lsc.tasks = 1
    importer = ProjectImporter(lsc, ledger, state_prefix="_sftflow", batch_size=10,
                               submit=lsc.submit(ledger))
    importer.open("2026-01-01")
    assert importer.known == {prompt_id("x")} and importer.totals.recovered_batches == 0
    importer.add_file(ObjectInfo("in/a.jsonl", '"e"', 1), "s3://b/in/a.jsonl",
                      FileIntake(prompts("x", "y"), [], None, complete=False))
    totals = importer.finish()
    assert (totals.imported, totals.task_number, totals.verified) == (1, 2, True)
    assert ledger.processed_objects() == {} and ledger.load("2026-01-01").pending == []
