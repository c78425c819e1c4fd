"""The ingest lock against the real SeaweedFS: one holder at a time, a lease that expires when
its holder dies, and a fence that keeps a holder who lost its lease from writing."""

from __future__ import annotations

import threading
import time

import pytest

from sftflow.tasks.ingest.ledger import Ledger
from sftflow.tasks.versions.locks import LeaseLost, LockRecord, LockTimeout, lock_key, s3_lock

pytestmark = pytest.mark.integration


def record(s3, name: str) -> LockRecord:
    return LockRecord.model_validate_json(s3.get_bytes(lock_key("_sftflow", name))[0])


def test_two_holders_contend_one_waits_then_gets_it_after_release(s3):
    a = s3_lock(s3, s3.bucket, "_sftflow", "l1", lease_s=30)
    b = s3_lock(s3, s3.bucket, "_sftflow", "l1", lease_s=30)
    got: list[float] = []
    with a.held(timeout_s=5):
        assert a.token == 1 and record(s3, "l1").owner == a.owner
        assert not b.try_acquire()

        def wait_for_b() -> None:
            with b.held(timeout_s=20):
                got.append(time.monotonic())

        waiter = threading.Thread(target=wait_for_b)
        waiter.start()
        time.sleep(1.5)  # on purpose: time passes, and b keeps waiting while a holds the lock
        assert not got  # still waiting while a holds it
        released_at = time.monotonic()
    waiter.join(30)
    assert got and got[0] >= released_at
    assert b.token == 2  # fencing tokens only go up
    assert record(s3, "l1").released


def test_waiting_ends_with_a_clear_error_naming_the_holder(s3):
    a = s3_lock(s3, s3.bucket, "_sftflow", "l2", lease_s=30)
    with a.held(timeout_s=5), pytest.raises(LockTimeout, match="still held after 1 s by .*:"):
        s3_lock(s3, s3.bucket, "_sftflow", "l2").acquire(timeout_s=1)


def test_the_holder_renews_its_lease_while_it_works(s3):
    a = s3_lock(s3, s3.bucket, "_sftflow", "l3", lease_s=1.5)
    with a.held(timeout_s=5):
        first = record(s3, "l3").expires_at
        time.sleep(3.5)  # on purpose: more than two leases pass while a works
        assert record(s3, "l3").expires_at > first
        assert not s3_lock(s3, s3.bucket, "_sftflow", "l3").try_acquire()
        a.fence()  # still ours


def test_a_dead_holders_lock_is_taken_over_after_its_lease_and_the_stale_holder_cannot_write(s3):
    # a 4 s lease: with 1 s, a loaded CI run's S3 round-trips outlasted it before the first write
    stale = s3_lock(s3, s3.bucket, "_sftflow", "l4", lease_s=4)
    assert stale.try_acquire()  # acquired, then never renewed: as a killed or frozen holder
    ledger = Ledger(s3, s3.bucket, "_sftflow", 7, fence=stale.fence)
    ledger.mark_pending("b0", 1)  # while the lease holds, the holder writes
    new = s3_lock(s3, s3.bucket, "_sftflow", "l4", lease_s=30)
    assert not new.try_acquire()
    with new.held(timeout_s=30):  # waits until the stale holder's lease has run out
        assert new.token == stale.token + 1
        with pytest.raises(LeaseLost, match="token 1"):
            ledger.confirm("b0", ["a"], 1)
        with pytest.raises(LeaseLost):
            ledger.mark_pending("b1", 1)
        assert s3.head(ledger.segment_key("b0")) is None  # nothing was written
        assert s3.head(f"{ledger.root}/pending/b1.json") is None
        assert not stale.renew()  # nor can it get the lease back
        Ledger(s3, s3.bucket, "_sftflow", 7, fence=new.fence).confirm("b0", ["a"], 1)
    stale.release()  # a stale holder's release does not free the new holder's record
    assert record(s3, "l4").owner == new.owner


HOLDER = """
import sys, time
from sftflow.tasks.adapters.clients import Clients
from sftflow.tasks.versions.locks import build_lock
s3 = Clients.for_bucket(sys.argv[1]).s3
with build_lock(s3, sys.argv[2], lease_s=float(sys.argv[3])).held(timeout_s=10) as lock:
    print(lock.token, flush=True)
    time.sleep(600)  # working (and renewing) until killed
"""


def test_a_killed_build_holder_is_taken_over_after_its_lease_a_live_one_never(s3, tmp_path):
    """A real holder process with a 2 s lease: alive, its renewals keep every contender out for
    three leases; SIGKILLed, its lock is taken over within the lease (plus a poll)."""
    import os
    import signal
    import subprocess
    import sys

    from sftflow.tasks.versions.locks import build_lock, build_lock_name

    dataset = f"ds-{tmp_path.name[-8:]}"
    env = {**os.environ, "SFTFLOW_S3__BUCKET": s3.bucket}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, s3.bucket, dataset, "2"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"  # it holds the lock, token 1
        contender = build_lock(s3, dataset, lease_s=2)
        with pytest.raises(LockTimeout, match="still held after 6 s"):
            contender.acquire(timeout_s=6)  # three leases: renewed, never overtaken
        assert holder.poll() is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    killed_at = time.monotonic()
    assert not record(s3, build_lock_name(dataset)).released  # a dead holder releases nothing
    with contender.held(timeout_s=20):
        waited = time.monotonic() - killed_at
        assert contender.token == 2
    assert waited < 2 + 5 + 1  # the lease, at most one backoff poll (5 s), and some slack
    assert record(s3, build_lock_name(dataset)).released


def test_a_waiter_takes_a_dead_holders_lock_as_its_lease_ends_not_at_its_next_backoff_poll(s3):
    """The waiter polls with backoff (0.5, 1, 2, 4 s, +-25 %: its 4th poll comes 5.6 s or more
    after the first) but never sleeps past the lease end it read: the lock is taken as the
    5 s lease of the dead holder ends."""
    dead = s3_lock(s3, s3.bucket, "_sftflow", "l5", lease_s=5)
    assert dead.try_acquire()
    started = time.monotonic()
    waiter = s3_lock(s3, s3.bucket, "_sftflow", "l5", lease_s=30)
    waiter.acquire(timeout_s=20)
    assert waiter.token == 2
    assert time.monotonic() - started < 5.5
