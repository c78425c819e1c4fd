"""``refs/latest`` orders commits by the watermark of what each build read (issue #18 item 1),
on the real S3: whichever path built a version (incremental, full, scratch), latest never moves
to a version whose Label Studio read is older than the read of the version it names."""

from __future__ import annotations

import pytest

from sftflow.tasks.versions.commit import CommitRequest, commit_version
from sftflow.tasks.versions.read import load_manifest
from sftflow.tasks.versions.refs import latest_version
from tests.tasks._datasets import final_rows

pytestmark = pytest.mark.integration

CFG = {"eval_fraction": 0.1}


def _incremental(mark: str) -> dict:
    """The source an incremental build records: a watermark, no export snapshot."""
    return {"project_id": 1, "mode": "incremental", "watermark": mark}


def _full(snapshot_at: str, mark: str) -> dict:
    """The source a full build records: its snapshot and the watermark taken from it."""
    return {"project_id": 1, "mode": "full", "export_id": 7, "snapshot_at": snapshot_at,
            "watermark": mark}


def _commit(s3, rows, source, dataset="d"):
    return commit_version(s3, CommitRequest(dataset=dataset, rows=rows, config=CFG,
                                            source=source, stats={}, shard_rows=100))


def test_an_incremental_build_that_read_earlier_never_moves_latest_back(s3):
    """B read at 12:05 and committed; A read at 12:00, stalled, and commits after B: latest
    stays on B, and A reports it was superseded (so it is not announced)."""
    b = _commit(s3, final_rows(30), _incremental("2026-03-01T12:05:00.000000Z"))
    a = _commit(s3, final_rows(20), _incremental("2026-03-01T12:00:00.000000Z"))
    assert b.ref_updated and a.created
    assert (a.ref_updated, a.latest, a.superseded_by) == (False, b.version, b.version)
    assert latest_version(s3, "d") == b.version
    # the watermark is in the manifest's source, and not in the version id
    assert load_manifest(s3, "d", a.version, verify=False).source["watermark"] == \
        "2026-03-01T12:00:00.000000Z"
    again = _commit(s3, final_rows(20), _incremental("2026-03-01T12:10:00.000000Z"))
    assert again.version == a.version and not again.created
    assert again.ref_updated and latest_version(s3, "d") == a.version  # a later read moves it


def test_a_full_build_after_an_incremental_latest_is_ordered_by_the_watermark(s3):
    """latest came from an incremental build (no snapshot time): a full build whose snapshot
    is older must still leave it alone; a newer one moves it."""
    inc = _commit(s3, final_rows(30), _incremental("2026-03-01T12:05:00.000000Z"))
    old_full = _commit(s3, final_rows(25), _full("2026-03-01T12:01:00.123456Z",
                                                 "2026-03-01T12:00:50.123456Z"))
    assert not old_full.ref_updated and old_full.superseded_by == inc.version
    new_full = _commit(s3, final_rows(35), _full("2026-03-01T12:09:00.123456Z",
                                                 "2026-03-01T12:08:50.123456Z"))
    assert new_full.ref_updated and latest_version(s3, "d") == new_full.version
    late_inc = _commit(s3, final_rows(30), _incremental("2026-03-01T12:06:00.000000Z"))
    assert not late_inc.ref_updated and late_inc.superseded_by == new_full.version


def test_reads_within_the_same_second_are_not_older(s3):
    """The incremental watermark has a second's precision (the server's Date header): a read
    in the same second as latest's is not older, so it moves latest."""
    first = _commit(s3, final_rows(30), _full("2026-03-01T12:00:10.900000Z",
                                              "2026-03-01T12:00:00.900000Z"))
    second = _commit(s3, final_rows(31), _incremental("2026-03-01T12:00:00.000000Z"))
    assert first.ref_updated and second.ref_updated
    assert latest_version(s3, "d") == second.version
