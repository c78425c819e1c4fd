"""The ingest flow end to end on the real stack: S3 files -> Label Studio tasks, exactly once."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sftflow.core.errors import ConfigError
from sftflow.flows.ingest import IngestParams, ingest_prompts
from sftflow.tasks.labelstudio.imports import iter_project_tasks, task_count, wait_settled
from sftflow.tasks.prompts import FieldMapping, Limits, prompt_id
from tests.conftest import unique

pytestmark = [pytest.mark.integration, pytest.mark.prefect]
ROOT = Path(__file__).parents[2]


@pytest.fixture()
def title(labelstudio):
    name = unique("t")
    yield name
    for p in labelstudio.projects.list(title=name):
        labelstudio.projects.delete(id=p.id)


def put_jsonl(s3, key: str, prompts: list, gz: bool = False) -> None:
    body = "".join(json.dumps({"prompt": p, "template": "q"}, ensure_ascii=False) + "\n"
                   for p in prompts).encode()
    s3.put_bytes(key, gzip.compress(body) if gz else body)


def project_prompts(labelstudio, title: str) -> tuple[int, Counter, list[dict]]:
    (project,) = [p for p in labelstudio.projects.list(title=title) if p.title == title]
    data = [d for _, d in iter_project_tasks(labelstudio, project.id)]
    return project.id, Counter(d["prompt_id"] for d in data), data


def test_prompts_land_once_and_reruns_import_nothing(prefect_harness, s3, labelstudio, title):
    put_jsonl(s3, "in/a.jsonl", [f"What is {i} + {i}?" for i in range(120)])
    put_jsonl(s3, "in/sub/b.jsonl.gz", [f"what is {i} +  {i}?" for i in range(100, 150)], gz=True)
    params = IngestParams(source=f"s3://{s3.bucket}/in/", project=title, batch_size=50)

    first = ingest_prompts(params)
    assert (first.files_read, first.records, first.imported, first.duplicate) == (2, 170, 150, 20)
    assert first.quarantined == 0 and first.batches == 3 and first.verified
    project_id, ids, data = project_prompts(labelstudio, title)
    assert len(ids) == 150 and set(ids.values()) == {1}
    task = next(d for d in data if d["prompt"] == "What is 7 + 7?")
    assert task["prompt_id"] == prompt_id("what is 7 + 7?")
    assert task["source"] == f"s3://{s3.bucket}/in/a.jsonl" and task["source_row"] == 8
    assert task["source_etag"] and task["ingest_batch"]

    again = ingest_prompts(params)
    assert (again.files_unchanged, again.files_read, again.records, again.imported) == (2, 0, 0, 0)
    assert again.full_scans == 0 and again.task_number == 150

    # A changed object is read again; only its new prompts are imported.
    put_jsonl(s3, "in/a.jsonl", [f"What is {i} + {i}?" for i in range(120)]
              + [f"A new question {i}" for i in range(5)])
    third = ingest_prompts(params)
    assert (third.files_read, third.records, third.imported, third.duplicate) == (1, 125, 5, 120)
    assert task_count(labelstudio, project_id) == 155

    # Ledger gone: the project itself is read back and nothing is imported twice.
    s3.delete(o.key for o in s3.list("_sftflow/ingest/"))
    fourth = ingest_prompts(params)
    assert (fourth.full_scans, fourth.imported, fourth.duplicate) == (1, 0, 175)
    assert fourth.task_number == 155 and fourth.verified


def test_max_records_leaves_the_rest_for_the_next_run(prefect_harness, s3, labelstudio, title):
    for f in range(3):
        put_jsonl(s3, f"in/{f}.jsonl", [f"limited {f}-{i}" for i in range(10)])
    params = IngestParams(source=f"s3://{s3.bucket}/in/", project=title, max_records=15)
    first = ingest_prompts(params)
    assert (first.files_read, first.records, first.imported) == (2, 15, 15)
    second = ingest_prompts(params.model_copy(update={"max_records": None}))
    assert (second.files_unchanged, second.files_read, second.records) == (1, 2, 20)
    assert (second.imported, second.duplicate) == (15, 5)
    assert second.task_number == 30


def test_malformed_corpus_is_quarantined_with_reasons(prefect_harness, s3, labelstudio, title):
    good = [json.dumps({"prompt": f"Summarise article {i}"}) for i in range(10)]
    s3.put_bytes("in/mixed.jsonl", "\n".join(
        good[:5] + ['{"prompt": ""}', "{oops", "[1, 2]", '{"text": "no prompt field"}',
                    '{"prompt": 7}'] + good[5:]).encode() + b'\n{"prompt": "bad \xff byte"}\n')
    s3.put_bytes("in/binary.jsonl", b"\x00\x01\x02\x03" * 100)
    s3.put_bytes("in/truncated.jsonl.gz", gzip.compress(("\n".join(good) + "\n").encode())[:-20])
    s3.put_bytes("in/notes.txt", b"not a prompt file")
    s3.put_bytes("in/big.jsonl", ("\n".join(good) * 50).encode())
    s3.put_bytes("in/array.json", json.dumps([{"prompt": "Array prompt"}, "just a string"]).encode())
    s3.put_bytes("in/table.csv", b"prompt,lang\nCSV prompt,en\n,en\n")
    s3.put_bytes("in/broken.json", b'[{"prompt": "x"},')

    report = ingest_prompts(IngestParams(
        source=f"s3://{s3.bucket}/in/", project=title, limits=Limits(max_file_bytes=10_000)))

    assert report.records == report.imported + report.duplicate + report.quarantined
    assert report.files_read == 8 and report.files_quarantined == 5
    assert report.reasons == {
        "empty_prompt": 2, "file:binary": 1, "file:too_large": 1, "file:unparseable": 2,
        "file:unsupported_type": 1, "invalid_json": 1, "invalid_utf8": 1, "missing_prompt": 1,
        "not_object": 2, "wrong_type": 1,
    }
    _, ids, data = project_prompts(labelstudio, title)
    texts = {d["prompt"] for d in data}
    assert {f"Summarise article {i}" for i in range(10)} | {"Array prompt", "CSV prompt"} == texts
    assert report.imported == 12 and set(ids.values()) == {1}

    reason = json.loads(s3.get_bytes(next(
        o.key for o in s3.list("_sftflow/quarantine/files/in/binary.jsonl@")
        if o.key.endswith(".reason.json")))[0])
    assert reason["reason"] == "binary" and reason["source"] == f"s3://{s3.bucket}/in/binary.jsonl"
    rows = [json.loads(line) for line in s3.get_bytes(next(
        o.key for o in s3.list("_sftflow/quarantine/records/in/mixed.jsonl@")))[0].splitlines()]
    assert [(r["row"], r["reason"]) for r in rows] == [
        (6, "empty_prompt"), (7, "invalid_json"), (8, "not_object"), (9, "missing_prompt"),
        (10, "wrong_type"), (16, "invalid_utf8")]
    # Quarantined files are recorded as processed: the rerun does not read them again.
    assert ingest_prompts(IngestParams(source=f"s3://{s3.bucket}/in/", project=title)).files_read == 0


def test_alpaca_style_cjk_rows_from_shared_data(prefect_harness, s3, labelstudio, title, shared_data):
    s3.put_bytes("zh/alpaca.json", (shared_data / "alpaca_zh_10000.json").read_bytes())
    report = ingest_prompts(IngestParams(
        source=f"s3://{s3.bucket}/zh/", project=title,
        fields=FieldMapping(prompt_field="instruction", input_field="input")))
    assert report.records == 2000
    assert report.records == report.imported + report.duplicate + report.quarantined
    rows = json.loads((shared_data / "alpaca_zh_10000.json").read_text())
    expected = {prompt_id(r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else ""))
                for r in rows if r["instruction"].strip()}
    _, ids, _ = project_prompts(labelstudio, title)
    assert set(ids) == expected and set(ids.values()) == {1}


def test_incompatible_project_is_an_error_not_a_change(prefect_harness, s3, labelstudio, title):
    labelstudio.projects.create(title=title, label_config='<View><Text name="t" value="$t"/></View>')
    put_jsonl(s3, "in/a.jsonl", ["one"])
    with pytest.raises(ConfigError, match="incompatible"):
        ingest_prompts(IngestParams(source=f"s3://{s3.bucket}/in/", project=title))


def test_concurrent_runs_on_one_project_do_not_double_import(prefect_harness, s3, labelstudio, title):
    for f in range(4):
        put_jsonl(s3, f"in/{f}.jsonl", [f"file {f} prompt {i}" for i in range(300)])
    params = IngestParams(source=f"s3://{s3.bucket}/in/", project=title, batch_size=200)
    from sftflow.tasks.labelstudio.projects import ensure_project

    ensure_project(labelstudio, title)  # both runs find it (creation races are covered apart)
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(ingest_prompts, [params, params]))
    assert sorted(r.imported for r in reports) == [0, 1200]
    _, ids, _ = project_prompts(labelstudio, title)
    assert len(ids) == 1200 and set(ids.values()) == {1}


KILLED_RUN = """
import sys
from sftflow.flows.ingest import IngestParams, ingest_prompts
ingest_prompts(IngestParams(source=sys.argv[1], project=sys.argv[2], batch_size=400))
"""


@pytest.fixture()
def stack_prefect(stack):
    """The local stack's Prefect server. The kill test needs it rather than the test harness:
    a killed run's concurrency lease is revoked by the server's repossessor service, which
    Prefect's ephemeral (harness) server does not run."""
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = stack.prefect.api_url
    try:
        httpx.get(f"{url}/health", timeout=5).raise_for_status()
    except httpx.HTTPError:
        pytest.skip(f"the stack's Prefect server at {url} is not running (sftflow stack up)")
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


def test_killed_mid_import_then_rerun_leaves_each_prompt_once(
    stack_prefect, s3, labelstudio, title
):
    prompts = [f"Killed run prompt {i}: " + "lorem ipsum " * 30 for i in range(4000)]
    for f in range(10):
        put_jsonl(s3, f"in/{f:02d}.jsonl", prompts[f * 400:(f + 1) * 400])
    from sftflow.tasks.labelstudio.projects import ensure_project

    project = ensure_project(labelstudio, title)
    env = {**os.environ, "PREFECT_API_URL": stack_prefect}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, f"s3://{s3.bucket}/in/", title],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while task_count(labelstudio, project.id) < 400 and time.monotonic() < deadline:
            assert proc.poll() is None, "the ingest subprocess ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    # A request in flight at the kill may still finish on the server: count once it is done.
    landed = wait_settled(lambda: task_count(labelstudio, project.id), settle_s=2)
    assert 400 <= landed < 4000  # killed after the first batch, before the end

    # The rerun waits for the dead run's lease to expire (60 s + the repossessor's loop).
    report = ingest_prompts(IngestParams(source=f"s3://{s3.bucket}/in/", project=title,
                                         batch_size=400, lock_timeout_s=240))
    _, ids, _ = project_prompts(labelstudio, title)
    assert len(ids) == 4000 and set(ids.values()) == {1}
    assert report.records == report.imported + report.duplicate + report.quarantined
    assert report.imported == 4000 - landed and report.task_number == 4000
