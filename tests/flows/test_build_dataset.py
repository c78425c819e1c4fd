"""The build_dataset flow end to end on the real stack: Label Studio -> S3 version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftflow.flows.build_dataset import BuildParams, build_dataset
from sftflow.tasks.versions import commit as version_commit
from sftflow.tasks.versions.manifest import file_key
from sftflow.tasks.versions.read import load_manifest
from sftflow.tasks.versions.refs import latest_version, versioned_event_id
from tests.conftest import unique
from tests.tasks._datasets import annotation, make_project, textarea

pytestmark = [pytest.mark.integration, pytest.mark.prefect]


_A = ["amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "heron", "iris", "jade"]
_B = ["kite", "lotus", "maple", "nectar", "onyx", "pearl"]


def _word(i: int) -> str:
    """A distinct made-up word per i (numbers alone would not do: near-duplicate shingles read
    every digit run as 0)."""
    return _A[i % 10] + _B[i // 10]


def _tasks() -> list[dict]:
    """60 distinct Q/A tasks plus every kind of trouble, each with a known fate."""
    tasks = [
        {"data": {"prompt": f"In one sentence, what does the word {_word(i)} mean?"},
         "annotations": [annotation(f"Word {_word(i)} means thing {_word(i)}; it is used in "
                                    f"context {_word(59 - i)}.")]}
        for i in range(60)
    ]
    tasks += [
        # exact duplicate of task 0 (same prompt and response, other task): dedup drops one
        {"data": {"prompt": f"In one sentence, what does the word {_word(0)} mean?"},
         "annotations": [annotation(f"Word {_word(0)} means thing {_word(0)}; it is used in "
                                    f"context {_word(59)}.")]},
        # several annotations: 'latest' keeps the last one only
        {"data": {"prompt": "Name a primary colour."},
         "annotations": [annotation("Red is a primary colour.", ground_truth=True),
                         annotation("Blue is a primary colour.")]},
        {"data": {"prompt": "Skipped task"}, "annotations": [annotation("x", cancelled=True)]},
        {"data": {"prompt": "Empty answer"}, "annotations": [annotation("   ")]},
        {"data": {"prompt": "Echo"}, "annotations": [annotation("Echo")]},
        {"data": {"prompt": "Contact?"},
         "annotations": [annotation("Mail support@example.com for help with the account.")]},
        {"data": {"prompt": "Credentials?"},
         "annotations": [annotation("Use AKIAIOSFODNN7EXAMPLE as the access key id.")]},
        {"data": {"prompt": "Other widget"},
         "annotations": [annotation(None, result=[textarea(["x"], from_name="comment")])]},
        {"data": {"prompt": "Bad text"},
         "annotations": [annotation(None, result=[textarea("not a list")])]},
        {"data": {"prompt": "Nobody answered yet"}},
    ]
    return tasks


@pytest.fixture()
def project(labelstudio):
    p = make_project(labelstudio, unique("t"), _tasks())
    yield p
    labelstudio.projects.delete(id=p.id)


def test_build_counts_everything_commits_and_rebuilds_as_noop(prefect_harness, s3, labelstudio,
                                                              project):
    params = BuildParams(project=project.title, dataset="qa", bucket=s3.bucket)
    report = build_dataset(params)
    assert report.created and report.ref_updated and report.version
    export, filters, dedup = (report.counts[k] for k in ("export", "filters", "dedup"))
    assert export["tasks"] == 70 and export["cancelled"] == 1
    assert export["excluded:unknown_from_name"] == 1 and export["excluded:malformed_text"] == 1
    assert export["superseded_annotations"] == 1 and export["rows"] == 66
    assert filters["dropped:empty_response"] == 1
    assert filters["dropped:response_equals_prompt"] == 1
    assert filters["dropped:secret:aws_access_key"] == 1 and filters["redacted:email"] == 1
    assert filters["kept"] == 63
    assert dedup["dropped:exact_duplicate"] == 1 and dedup["leakage_clusters"] == 0
    assert sum(report.rows.values()) == 62 and report.rows["eval"] > 0

    m = load_manifest(s3, "qa", report.version)  # verified
    assert m.source["project_id"] == project.id and m.source["export_id"] > 0
    assert m.source["total_annotations_number"] >= 66
    assert m.stats["filters"]["kept"] == 63 and m.run_id
    ex_file = m.files_of("exclusions")[0]
    lines = [json.loads(x) for x in s3.get_bytes(file_key(m, ex_file.path))[0]
             .decode().splitlines()]
    reasons = sorted(e["reason"] for e in lines)
    assert reasons == sorted(["unknown_from_name", "malformed_text", "empty_response",
                              "response_equals_prompt", "secret:aws_access_key", "duplicate"])
    assert "AKIAIOSFODNN7EXAMPLE" not in json.dumps(lines)

    rows = _rows(s3, m)
    assert {r["completion"] for r in rows if r["prompt"] == "Name a primary colour."} == {
        "Blue is a primary colour."}
    assert any("[EMAIL]" in r["completion"] for r in rows)
    assert all(r["task_id"] and r["annotation_id"] and r["prompt_id"] for r in rows)

    again = build_dataset(params)
    assert again.version == report.version and not again.created and again.bytes_written == 0

    labelstudio.projects.import_tasks(id=project.id, request=[
        {"data": {"prompt": "A new question arrives?"},
         "annotations": [annotation("And a new, careful answer follows it.")]}])
    third = build_dataset(params)
    assert third.created and third.parent == report.version
    assert sum(third.rows.values()) == 63
    assert third.bytes_written < report.bytes_written


def _rows(s3, manifest) -> list[dict]:
    import io

    import pyarrow.parquet as pq

    out = []
    for f in manifest.files_of("parquet"):
        data, _ = s3.get_bytes(file_key(manifest, f.path))
        out += pq.read_table(io.BytesIO(data)).to_pylist()
    return out


def test_empty_project_makes_no_version(prefect_harness, s3, labelstudio):
    p = make_project(labelstudio, unique("t"), [{"data": {"prompt": "unanswered"}}])
    try:
        report = build_dataset(BuildParams(project=str(p.id), dataset="empty", bucket=s3.bucket))
    finally:
        labelstudio.projects.delete(id=p.id)
    assert report.version is None and not report.created
    assert "no version made" in report.message
    assert list(s3.list("datasets/")) == []


def test_dask_cluster_builds_the_identical_version(prefect_harness, s3, project):
    from dask.distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    params = BuildParams(project=project.title, dataset="threads", bucket=s3.bucket, shard_rows=10)
    on_threads = build_dataset(params)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        flow = build_dataset.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        on_dask = flow(params.model_copy(update={"dataset": "dask"}))
    assert on_dask.created and on_dask.version == on_threads.version
    a = load_manifest(s3, "threads", on_threads.version)
    b = load_manifest(s3, "dask", on_dask.version)
    assert [f.sha256 for f in a.files_of("parquet")] == [f.sha256 for f in b.files_of("parquet")]


def test_several_annotators_per_prompt_never_straddle_the_split(prefect_harness, s3, labelstudio,
                                                                shared_data: Path):
    """Real data: 8 models' answers to the same 60 prompts, one annotation each, policy 'all'."""
    files = sorted((shared_data / "user_oriented").glob("*_predictions.jsonl"))[:8]
    answers: dict[str, list[str]] = {}
    for path in files:
        for line in path.read_text().splitlines()[:60]:
            rec = json.loads(line)
            answers.setdefault(rec["prompt"], []).append(rec.get("response") or "")
    tasks = [{"data": {"prompt": p}, "annotations": [annotation(a) for a in ans]}
             for p, ans in answers.items()]
    p = make_project(labelstudio, unique("t"), tasks)
    try:
        report = build_dataset(BuildParams(project=p.title, dataset="uo", bucket=s3.bucket,
                                           annotation_policy="all", eval_fraction=0.2))
    finally:
        labelstudio.projects.delete(id=p.id)
    m = load_manifest(s3, "uo", report.version)
    rows = _rows(s3, m)
    assert len(rows) == sum(report.rows.values()) > len(answers)  # several answers per prompt
    split_of: dict[str, set] = {}
    for r in rows:
        split_of.setdefault(r["prompt_id"], set()).add(r["split"])
        split_of.setdefault("c" + r["cluster_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert report.rows["eval"] > 0 and report.rows["train"] > 0


def test_cli_build_and_datasets_commands(prefect_harness, s3, project, tmp_path):
    from typer.testing import CliRunner

    from sftflow.cli import app

    runner = CliRunner()

    def run(*args: str) -> dict | list:
        result = runner.invoke(app, [*args, "--bucket", s3.bucket, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout[result.stdout.index("{") if result.stdout.lstrip()
                                         .startswith("{") else result.stdout.index("["):])

    built = run("build", "--project", project.title, "--dataset", "cli")
    assert built["created"] and built["version"]
    listed = run("datasets", "list")
    assert listed == {"datasets": [{"dataset": "cli", "latest": built["version"],
                                    "rows": built["rows"]}], "damaged": []}
    shown = run("datasets", "show", f"cli@{built['version']}", "--verify")
    assert shown["verified"] and shown["rows"] == built["rows"] and shown["train_files"]
    assert "api_key" not in json.dumps(shown)
    tagged = run("datasets", "tag", "cli", "gold")
    assert tagged["version"] == built["version"]
    diff = run("datasets", "diff", "cli@gold", built["version"])
    assert diff["unchanged"] == sum(built["rows"].values())
    pulled = run("datasets", "pull", "cli@gold", str(tmp_path / "out"))
    assert (tmp_path / "out" / "README.md").is_file() and pulled["files"] > 0
    gc = run("datasets", "gc", "cli")
    assert gc["dry_run"] and gc["unreferenced"] == 0
    bad = runner.invoke(app, ["datasets", "show", "cli@nope", "--bucket", s3.bucket])
    assert bad.exit_code != 0


@pytest.mark.parametrize("step", ["files", "manifest"])
def test_a_build_crashing_in_its_commit_leaves_latest_and_a_rerun_completes(
        prefect_harness, s3, project, monkeypatch, step):
    import sftflow.flows.build_dataset as flow_module
    from sftflow.core.errors import SftflowError
    from sftflow.tasks.runtime.declare import io_task

    params = BuildParams(project=project.title, dataset="crash", bucket=s3.bucket)

    def crash(name: str) -> None:
        if name == step:
            raise SftflowError(f"crash after {name}")  # not transient: no task retry

    crashing = io_task(name="commit-version")(
        lambda s3_, request: version_commit.commit_version(s3_, request, hook=crash))
    monkeypatch.setattr(flow_module, "commit_version_task", crashing)
    with pytest.raises(SftflowError, match=f"crash after {step}"):
        build_dataset(params)
    assert latest_version(s3, "crash") is None  # readers see no half version
    monkeypatch.undo()

    rerun = build_dataset(params)
    assert rerun.ref_updated and rerun.latest == rerun.version
    assert rerun.created == (step != "manifest")  # the manifest was already there
    m = load_manifest(s3, "crash")  # complete: every file verified
    assert m.version == rerun.version and sum(m.rows.values()) == 62


def _versioned_events(dataset: str, want: int, settle_s: float = 4.0) -> list[dict]:
    """``dataset.versioned`` events of ``dataset`` as the harness's events API stores them,
    once their number has stopped changing (the client sends events in the background)."""
    import time

    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"event": {"name": ["sftflow.dataset.versioned"]},
                       "resource": {"id": [f"sftflow.dataset.{dataset}"]}}, "limit": 50}
    deadline, seen, since = time.monotonic() + 40, None, time.monotonic()
    while time.monotonic() < deadline:
        r = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=30)
        r.raise_for_status()
        events = r.json()["events"]
        if seen is None or len(events) != len(seen):
            seen, since = events, time.monotonic()
        elif len(events) >= want and time.monotonic() - since >= settle_s:
            break
        time.sleep(0.5)  # a poll loop's pause: until the count has settled, or the deadline
    return seen or []


@pytest.mark.parametrize("point", ["versioning.after-manifest", "versioning.after-ref"])
def test_a_commit_failing_past_the_manifest_still_announces_the_version_once(
        prefect_harness, s3, labelstudio, point):
    """Issue #10 item 5: the commit task fails right after the manifest (or the ref) is
    written; Prefect's retry finds the manifest there ("not created") and must still emit
    ``dataset.versioned``, with the version's deterministic id; an unchanged rebuild emits
    nothing more."""
    from sftflow.core import failpoints

    tasks = [{"data": {"prompt": f"What is item {i} used for, in one sentence?"},
              "annotations": [annotation(f"Item {i} is used for purpose number {i * 3}.")]}
             for i in range(6)]
    p = make_project(labelstudio, unique("t-ev"), tasks)
    dataset = unique("ev")
    params = BuildParams(project=str(p.id), dataset=dataset, bucket=s3.bucket)
    try:
        with failpoints.active({point: "raise@1"}):
            report = build_dataset(params)  # the commit task fails once; Prefect retries it
        assert not report.created and report.latest == report.version
        again = build_dataset(params)
    finally:
        labelstudio.projects.delete(id=p.id)
    assert again.version == report.version and not again.created and not again.ref_updated
    events = _versioned_events(dataset, want=1)
    assert [e["id"] for e in events] == [str(versioned_event_id(dataset,
                                                                           report.version))]
    assert events[0]["payload"]["version"] == report.version


AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
GH_TOKEN = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
MAIL = "jane.doe@example.org"


def test_exclusions_never_store_a_secret_whatever_the_drop_reason(prefect_harness, s3,
                                                                  labelstudio):
    """Issue #10 item 6: rows dropped for another reason than the scan (and export-stage
    exclusions, which copy the prompt) still go through it before exclusions.jsonl is stored."""
    fruits = [("plum", "purple"), ("lime", "green"), ("banana", "yellow"),
              ("cherry", "red"), ("blueberry", "blue")]
    tasks = [{"data": {"prompt": f"Which colour is a ripe {f}, in one sentence?"},
              "annotations": [annotation(f"A ripe {f} is usually {c} all over.")]}
             for f, c in fruits]
    tasks += [
        {"data": {"prompt": f"Repeat {AWS_KEY}"},  # echoed: response_equals_prompt
         "annotations": [annotation(f"Repeat {AWS_KEY}")]},
        {"data": {"prompt": "Write to whom?"},  # far too long: too_long_chars
         "annotations": [annotation(f"Write to {MAIL}. " + "blah " * 60)]},
        {"data": {"prompt": f"Token {GH_TOKEN}?"},  # empty answer: empty_response
         "annotations": [annotation("  ")]},
        {"data": {"prompt": f"Mail {MAIL} and use {GH_TOKEN}"},  # export stage: other widget
         "annotations": [annotation(None, result=[textarea(["x"], from_name="comment")])]},
    ]
    p = make_project(labelstudio, unique("t-pii"), tasks)
    try:
        report = build_dataset(BuildParams(project=str(p.id), dataset="pii", bucket=s3.bucket,
                                           filters={"max_chars": 200}))
    finally:
        labelstudio.projects.delete(id=p.id)
    filters = report.counts["filters"]
    assert filters["dropped:response_equals_prompt"] == 1
    assert filters["dropped:too_long_chars"] == 1 and filters["dropped:empty_response"] == 1
    assert filters["kept"] == 5 and report.counts["export"]["excluded:unknown_from_name"] == 1
    m = load_manifest(s3, "pii", report.version)
    ex = m.files_of("exclusions")[0]
    stored = s3.get_bytes(file_key(m, ex.path))[0].decode()
    assert ex.rows == 4 and len(stored.splitlines()) == 4
    for secret in (AWS_KEY, GH_TOKEN, MAIL):
        assert secret not in stored
    assert "[AWS_ACCESS_KEY]" in stored and "[EMAIL]" in stored and "[GITHUB_TOKEN]" in stored


def test_a_version_reports_each_drafting_models_acceptance_and_leaves_unedited_drafts_out(
        prefect_harness, s3, labelstudio):
    """Issue #12: annotators start from a model's drafts (Label Studio predictions, the
    annotation's ``parent_prediction``). The incremental version built after them records the
    model's acceptance rate and edit similarity in its manifest, drops the drafts accepted
    unchanged (``draft_policy='exclude'``, the default) as a counted filter reason with an
    exclusion each, and keeps them under ``include``.

    Issue #20: the annotations carry Label Studio's ``lead_time`` (as the editor sets it; the
    API takes it too), and three tasks of the same period and prompt length are answered
    without a draft. The version reports the seconds the drafts saved per task and in total,
    per model and per annotator, beside the acceptance rate: in the build report, the
    manifest, the card and ``sftflow datasets show --json``. One drafted annotation made
    without a ``lead_time`` is counted apart; the first round's (imported, untimed) ones too,
    in the full export of the ``include`` build."""
    from sftflow.tasks.drafts.stage import draft_result

    def qa(i: int) -> tuple[str, str]:
        return (f"In one sentence, what is a {_word(i)} for?",
                f"A {_word(i)} is for holding {_word(59 - i)} near the {_word(i + 20)}.")

    p = make_project(labelstudio, unique("t-drafts"),
                     [{"data": {"prompt": qa(i)[0]}, "annotations": [annotation(qa(i)[1])]}
                      for i in range(6)])
    try:
        first = build_dataset(BuildParams(project=str(p.id), dataset="dr", bucket=s3.bucket))
        labelstudio.projects.import_tasks(id=p.id, request=[{"prompt": qa(i)[0]}
                                                            for i in range(6, 19)])
        open_tasks = sorted((t for t in labelstudio.tasks.list(project=p.id, fields="all")
                             if not t.annotations), key=lambda t: t.id)
        drafted, control = open_tasks[:10], open_tasks[10:]
        assert (len(drafted), len(control)) == (10, 3)
        # seconds in the editor: 10 s to accept a draft, 20-40 s to edit one (the last edit
        # made without a lead_time, as an API client does), 60-80 s without a draft
        seconds = [10.0] * 4 + [20.0, 25.0, 30.0, 35.0, 40.0, None]
        for n, task in enumerate(drafted):
            i = n + 6
            draft = f"A {_word(i)} is for holding things, most of the time."
            pred = labelstudio.predictions.create(task=task.id, result=draft_result(draft),
                                                  model_version="ft-model-1")
            answer = draft if n < 4 else qa(i)[1]  # four accepted as they are, six edited
            labelstudio.annotations.create(
                id=task.id, result=draft_result(answer), parent_prediction=pred.id,
                **({} if seconds[n] is None else {"lead_time": seconds[n]}))
        for n, task in enumerate(control):
            labelstudio.annotations.create(id=task.id, result=draft_result(qa(n + 16)[1]),
                                           lead_time=60.0 + 10 * n)
        second = build_dataset(BuildParams(project=str(p.id), dataset="dr", bucket=s3.bucket))
        included = build_dataset(BuildParams(project=str(p.id), dataset="dr-all",
                                             bucket=s3.bucket, draft_policy="include"))
    finally:
        labelstudio.projects.delete(id=p.id)

    assert second.mode == "incremental" and second.parent == first.version
    assert second.counts["export"]["rows_with_model_draft"] == 10
    assert second.counts["filters"]["dropped:accepted_draft_unchanged"] == 4
    assert second.counts["filters"]["kept"] == 9 and sum(second.rows.values()) == 15
    m = load_manifest(s3, "dr", second.version)
    model = m.stats["drafts"]["models"]["ft-model-1"]
    assert (model["rows"], model["accepted_unchanged"], model["acceptance_rate"]) == (10, 4, 0.4)
    assert 0 < model["mean_similarity_edited"] < model["mean_similarity"] < 1
    ex = m.files_of("exclusions")[0]
    stored = [json.loads(x) for x in s3.get_bytes(file_key(m, ex.path))[0]
              .decode().splitlines()]
    assert sorted(e["task_id"] for e in stored if e["reason"] == "accepted_draft_unchanged") == \
        sorted(t.id for t in drafted[:4])

    # Draft return: with a draft the median of [10 x4, 20, 25, 30, 35, 40] is 20 s, without
    # one the median of [60, 70, 80] is 70 s (one prompt-length bucket): 50 s saved a task,
    # 450 s over the 9 timed drafted annotations; the untimed one counted apart.
    ret = m.stats["drafts"]["return"]
    assert second.draft_return == ret
    assert ret["untimed"] == {"drafted": 1, "undrafted": 0}
    assert ret["baseline"]["annotations"] == 3 and ret["baseline"]["median_s"] == 70.0
    saved = ret["models"]["ft-model-1"]
    assert (saved["annotations"], saved["untimed"], saved["compared"]) == (10, 1, 9)
    assert (saved["median_with_draft_s"], saved["median_without_draft_s"]) == (20.0, 70.0)
    assert (saved["saved_per_task_s"], saved["saved_total_s"]) == (50.0, 450.0)
    assert saved["acceptance_rate"] == 0.4  # beside the seconds
    (person,) = ret["annotators"].values()  # the API token's user made every annotation
    assert (person["saved_per_task_s"], person["baseline_annotations"]) == (50.0, 3)
    assert ret["saved_total_s"] == 450.0
    card = s3.get_bytes(file_key(m, m.files_of("card")[0].path))[0].decode()
    assert "Draft return" in card
    assert "| `ft-model-1` | 10 | 1 | 9 | 20.0 | 70.0 | 50.0 | 450.0 | 0.400 |" in card
    show = _sftflow(s3, "datasets", "show", f"dr@{second.version}", "--json")
    assert show["draft_return"] == ret

    assert included.counts["filters"].get("dropped:accepted_draft_unchanged", 0) == 0
    assert sum(included.rows.values()) == 19
    full = load_manifest(s3, "dr-all", included.version).stats["drafts"]
    assert full["models"]["ft-model-1"]["acceptance_rate"] == 0.4
    # the full export snapshot carries lead_time too; the first round's imported
    # annotations have none and are counted apart
    assert full["return"]["untimed"] == {"drafted": 1, "undrafted": 6}
    assert full["return"]["models"]["ft-model-1"]["saved_total_s"] == 450.0


def _sftflow(s3, *args: str) -> dict:
    """The installed ``sftflow`` command's ``--json`` answer, against the test bucket."""
    import os
    import subprocess
    import sys

    res = subprocess.run([str(Path(sys.executable).parent / "sftflow"), *args, "--bucket",
                          s3.bucket], check=False, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)
