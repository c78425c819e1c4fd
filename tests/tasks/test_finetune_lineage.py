"""Lineage records and model refs in the real S3: create-only, compare-and-swap updates."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from sftflow.core.errors import SftflowError
from sftflow.tasks.finetune import lineage
from sftflow.tasks.finetune.lineage import LineageRecord
from sftflow.tasks.storage import PreconditionFailed

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
