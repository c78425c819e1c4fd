"""Lineage records and model refs in the real S3: create-only, compare-and-swap updates."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from sftflow.core.errors import SftflowError
from sftflow.tasks.adapters.s3 import PreconditionFailed
from sftflow.tasks.finetune import lineage
from sftflow.tasks.finetune.lineage import LineageRecord

pytestmark = pytest.mark.integration


def _record(job: str, dataset: str = "qa", **fields) -> LineageRecord:
    return LineageRecord(job=job, dataset=dataset, version="v1", backend="trl", base_model="m",
                         lineage_uri=f"s3://b/models/{job}/manifest.json", **{"status": "submitted", **fields})


def test_record_is_created_once_and_updates_never_lose_a_change(s3):
    _, created = lineage.create_record(s3, "models", _record("ft-a"))
    assert created
    again, created = lineage.create_record(s3, "models", _record("ft-a", status="running"))
    assert not created and again.status == "submitted"

    with ThreadPoolExecutor(8) as pool:  # 16 concurrent writers, each sets its own key
        list(pool.map(lambda i: lineage.update_record(s3, "models", "ft-a", {f"k{i}": i}, event=f"e{i}",
                                                      attempts=50), range(16)))
    final = lineage.load_record(s3, "models", "ft-a").to_dict()
    assert all(final[f"k{i}"] == i for i in range(16)) and len(final["history"]) == 16

    lineage.create_record(s3, "models", _record("ft-b", "other", submitted_at="2"))
    assert lineage.list_jobs(s3, "models") == ["ft-a", "ft-b"]
    assert [r.job for r in lineage.list_records(s3, "models", "qa")] == ["ft-a"]
    with pytest.raises(SftflowError, match="no model 'ft-zz'"):
        lineage.load_record(s3, "models", "ft-zz")

    # a record is read back only under its own name
    s3.put_bytes(lineage.manifest_key("models", "ft-c"), _record("ft-a").model_dump_json().encode())
    with pytest.raises(SftflowError, match="is the record of 'ft-a', not 'ft-c'"):
        lineage.load_record(s3, "models", "ft-c")


def test_best_ref_moves_only_from_the_state_it_was_read_in(s3):
    assert lineage.read_model_ref(s3, "models", "qa") == (None, None)
    lineage.set_model_ref(s3, "models", "qa", "ft-a", None)
    job, etag = lineage.read_model_ref(s3, "models", "qa")
    assert job == "ft-a"
    with pytest.raises(PreconditionFailed):
        lineage.set_model_ref(s3, "models", "qa", "ft-c", None)  # it exists now
    lineage.set_model_ref(s3, "models", "qa", "ft-b", etag)
    with pytest.raises(PreconditionFailed):
        lineage.set_model_ref(s3, "models", "qa", "ft-c", etag)  # stale ETag
    assert lineage.read_model_ref(s3, "models", "qa")[0] == "ft-b"
    assert lineage.list_jobs(s3, "models") == []  # refs are not models


def test_one_run_holds_the_submission_claim_until_it_names_the_job_or_the_claim_expires(s3):
    from datetime import timedelta

    from sftflow.core.clock import utc_now
    from sftflow.tasks.finetune.lineage import SubmissionClaim

    def attempt(run: str, ttl_s: float = 60, **kw):
        return lineage.claim_submission(
            s3, "models", _record("ft-c", claim=SubmissionClaim.new(run, ttl_s)), **kw)

    with ThreadPoolExecutor(8) as pool:  # 8 concurrent runs: exactly one gets the claim
        won = [mine for _, mine in pool.map(lambda i: attempt(f"run-{i}"), range(8))]
    assert won.count(True) == 1
    holder = lineage.load_record(s3, "models", "ft-c").claim.run_id
    assert attempt(holder)[1]  # the holder again (a retried run)
    record, mine = attempt("other")
    assert not mine and record.claim.run_id == holder  # live: wait

    later = utc_now() + timedelta(seconds=120)  # the holder died: its claim expired
    record, mine = attempt("other", now=later)
    assert mine and record.claim.run_id == "other"
    assert lineage.load_record(s3, "models", "ft-c").history[-1]["event"] == "claimed by run other"

    lineage.update_record(s3, "models", "ft-c", {"backend_job_id": "job-1"})
    record, mine = attempt("third", now=later + timedelta(seconds=600))
    assert not mine and record.backend_job_id == "job-1"  # named: watch it, never resubmit


def test_no_credential_of_the_tracking_uri_reaches_the_stored_record(s3, monkeypatch):
    """The MLflow tracking URI setting with ``user:password@``: the tracker's report (here: it is
    unreachable) goes into the stored lineage record without the password, in the URI and in
    the error text."""
    from sftflow.core.settings import Settings
    from sftflow.tasks.finetune.tracking import track_job

    secret = "pw-0b8e5a"
    settings = Settings(mlflow={"tracking_uri": f"http://ml:{secret}@127.0.0.1:9",
                                "deadline_s": 2})
    lineage.create_record(s3, "models", _record("ft-t"))
    record = lineage.load_record(s3, "models", "ft-t")
    tracked = track_job(settings, record.model_copy(update={"status": "failed", "error": "boom"}))
    assert tracked and tracked["tracking_uri"] == "http://127.0.0.1:9" and tracked["error"]
    lineage.update_record(s3, "models", "ft-t", {"status": "failed", "tracking": tracked})
    stored = s3.get_bytes(lineage.manifest_key("models", "ft-t"))[0].decode()
    assert '"tracking_uri": "http://127.0.0.1:9"' in stored and secret not in stored
