"""The submission claim in the real S3, renewed while its holder lives (issue 18, item 7).

Claim level, no training: ``hold_claim`` renews the holder's claim every third of its lifetime,
so another run never takes it over however long the block runs; once renewals stop (the block
ended without naming the job: as for a dead holder) the claim expires and another run takes it
over; renewal stops by itself once the job is named or the claim was taken over. The flow-level
test with a stalled training and a SIGKILLed holder is ``tests/flows/test_finetune_claim.py``.
"""

from __future__ import annotations

import pytest

from sftflow.core.clock import utc_now
from sftflow.tasks.finetune import lineage
from sftflow.tasks.finetune.lineage import LineageRecord, SubmissionClaim
from sftflow.tasks.runtime.polling import Backoff, wait_until

pytestmark = pytest.mark.integration

TTL_S = 3.0


def _record(job: str, run: str, ttl_s: float = TTL_S) -> LineageRecord:
    return LineageRecord(job=job, dataset="qa", version="v1", backend="trl", base_model="m", status="submitted",
                         lineage_uri=f"s3://b/models/{job}/manifest.json", claim=SubmissionClaim.new(run, ttl_s))


def _claim(s3, job: str, run: str) -> tuple[LineageRecord, bool]:
    return lineage.claim_submission(s3, "models", _record(job, run))


def test_a_held_claim_outlives_its_lifetime_and_expires_once_no_longer_renewed(s3):
    record, mine = _claim(s3, "ft-r", "holder")
    assert mine
    first_expiry = record.claim.expires_at
    with lineage.hold_claim(s3, "models", record, TTL_S) as renewal:
        # three lifetimes pass: another run asking all along never gets the claim
        takeovers: list[bool] = []

        def three_lifetimes() -> bool:
            takeovers.append(_claim(s3, "ft-r", "other")[1])
            return (utc_now() - first_expiry).total_seconds() > 2 * TTL_S

        assert wait_until(three_lifetimes, timeout_s=10 * TTL_S, backoff=Backoff(0.2, 0.3))
        assert len(takeovers) > 5 and not any(takeovers)
        held = lineage.load_record(s3, "models", "ft-r").claim
        assert held.run_id == "holder" and held.live(utc_now())
        assert renewal.renewed >= 2 and not renewal.lost

    # renewals stopped (as when the holder dies): within one lifetime the claim is taken over
    last = lineage.load_record(s3, "models", "ft-r").claim.expires_at
    taken = wait_until(lambda: _claim(s3, "ft-r", "other")[1], timeout_s=3 * TTL_S, backoff=Backoff(0.1, 0.2))
    assert taken and utc_now() >= last
    record = lineage.load_record(s3, "models", "ft-r")
    assert record.claim.run_id == "other" and record.history[-1]["event"] == "claimed by run other"

    # the old holder's renewal now finds another run's claim: lost, nothing written
    assert not lineage.renew_claim(s3, "models", "ft-r", SubmissionClaim.new("holder", TTL_S), TTL_S)
    assert lineage.load_record(s3, "models", "ft-r").claim == record.claim


def test_renewal_stops_once_the_job_is_named(s3):
    record, mine = _claim(s3, "ft-n", "holder")
    assert mine
    with lineage.hold_claim(s3, "models", record, TTL_S) as renewal:
        lineage.update_record(s3, "models", "ft-n", {"backend_job_id": "job-1"})
        assert wait_until(lambda: renewal.lost, timeout_s=3 * TTL_S, backoff=Backoff(0.1, 0.2))
    named = lineage.load_record(s3, "models", "ft-n")
    assert named.backend_job_id == "job-1" and named.claim.run_id == "holder"
    assert not lineage.renew_claim(s3, "models", "ft-n", record.claim, TTL_S)  # nothing left to renew
