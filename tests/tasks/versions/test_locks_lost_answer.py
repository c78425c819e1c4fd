"""A lock renewal whose answer is lost (issue #18, item 13b), against the real SeaweedFS behind
the fault proxy: the renewal landed on S3, its answer did not come back, so the client's retry
(same If-Match) is refused with 412. That costs a retry, never the lease: the holder re-reads
the record, finds it its own (same owner and token) and carries on with the record's ETag."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlparse

import pytest

from sftflow.tasks.adapters.s3 import build_s3
from sftflow.tasks.runtime.polling import Backoff, wait_until
from sftflow.tasks.versions.locks import LockRecord, lock_key, s3_lock
from tests.faults.proxy import Fault, FaultProxy

pytestmark = pytest.mark.integration

RENEWAL = {"method": "PUT", "path": r"/locks/", "header": r"^if-match:"}


def record(s3, name: str) -> LockRecord:
    return LockRecord.model_validate_json(s3.get_bytes(lock_key("_sftflow", name))[0])


@pytest.fixture()
def proxy(stack):
    up = urlparse(stack.s3.endpoint_url)
    with FaultProxy(up.hostname, up.port) as p:
        yield p


def proxied(stack, s3, proxy, **update):
    return build_s3(stack.s3.model_copy(update={"endpoint_url": proxy.url, "bucket": s3.bucket,
                                                **update}))


@pytest.mark.parametrize("lost_as", [None, 504], ids=["reset", "gateway-504"])
def test_a_renewal_whose_answer_is_lost_costs_a_retry_not_the_lease(stack, s3, proxy, lost_as):
    client = proxied(stack, s3, proxy)
    lock = s3_lock(client, s3.bucket, "_sftflow", "lost-1", lease_s=30)
    assert lock.try_acquire()
    before = record(s3, "lost-1").expires_at
    proxy.add(Fault("lose_response", **RENEWAL, status=lost_as))
    assert lock.renew(), "one lost renewal answer lost the lock"
    assert proxy.applied["lose_response"] == 1
    now = record(s3, "lost-1")
    assert (now.owner, now.token) == (lock.owner, 1) and now.expires_at > before
    lock.fence()  # still ours: writes go on
    assert lock.renew()  # the next renewal uses the record's ETag as usual
    lock.release()
    assert record(s3, "lost-1").released  # released, not left to expire


def test_a_renewal_that_failed_after_landing_does_not_fence_the_holder_out(stack, s3, proxy):
    """Every answer of a renewal lost, so the renewal raises (the client gave up); the write
    had landed, and the next fence re-reads the record: still ours."""
    client = proxied(stack, s3, proxy, max_attempts=0)
    lock = s3_lock(client, s3.bucket, "_sftflow", "lost-2", lease_s=30)
    assert lock.try_acquire()
    proxy.add(Fault("lose_response", **RENEWAL, status=None))
    with pytest.raises(Exception):  # noqa: B017 - whatever botocore raises for a reset
        lock.renew()
    lock.fence()
    assert lock.renew()
    other = s3_lock(s3, s3.bucket, "_sftflow", "lost-2", lease_s=30)
    assert not other.try_acquire()


def test_the_renewing_holder_survives_a_lost_answer_while_it_works(stack, s3, proxy):
    """The background renewal (every lease / 3) meets one lost answer; later renewals go on
    and the holder's writes are not refused (before the fix: LeaseLost, the ingest aborted)."""
    client = proxied(stack, s3, proxy)
    lock = s3_lock(client, s3.bucket, "_sftflow", "lost-3", lease_s=3)
    with lock.held(timeout_s=5):
        proxy.add(Fault("lose_response", **RENEWAL, status=None))
        assert wait_until(lambda: proxy.applied["lose_response"], timeout_s=10,
                          backoff=Backoff(0.05, 0.2))
        after_lost = record(s3, "lost-3").expires_at  # the lost renewal's own write
        later = after_lost + timedelta(seconds=1.5)  # a renewal after the lost one landed
        assert wait_until(lambda: record(s3, "lost-3").expires_at > later, timeout_s=10,
                          backoff=Backoff(0.1, 0.5)), "renewals stopped after the lost answer"
        lock.fence()
    assert record(s3, "lost-3").released


def test_an_acquisition_whose_answer_is_lost_is_ours_without_waiting_out_a_lease(
        stack, s3, proxy):
    """The taking write (If-None-Match) landed, its answer was lost, the retry got 412: the
    record read back is this contender's own, so it holds the lock now, not a lease later."""
    client = proxied(stack, s3, proxy)
    client.check_conditional_writes()  # the probe's writes pass untouched
    proxy.add(Fault("lose_response", method="PUT", path=r"/locks/", header=r"^if-none-match:",
                    status=None))
    lock = s3_lock(client, s3.bucket, "_sftflow", "lost-4", lease_s=30)
    assert lock.try_acquire()
    assert proxy.applied["lose_response"] == 1
    assert (record(s3, "lost-4").owner, lock.token) == (lock.owner, 1)
    lock.fence()
