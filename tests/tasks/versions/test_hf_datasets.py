"""``sftflow.load_dataset``: a committed version from the real SeaweedFS as a DatasetDict."""

from __future__ import annotations

import pytest

import sftflow
from sftflow.core.errors import SftflowError
from sftflow.tasks.versions.pull import pull_version
from sftflow.tasks.versions.read import load_manifest
from tests.tasks._finetune import make_version

pytestmark = pytest.mark.integration


def test_latest_and_pinned_versions_load_with_hf_split_names(s3):
    first = make_version(s3, "hf", 40, eval_every=5)
    second = make_version(s3, "hf", 50, eval_every=5, start=1)
    latest = sftflow.load_dataset("hf", bucket=s3.bucket)
    assert set(latest) == {"train", "validation"}
    assert (latest["train"].num_rows, latest["validation"].num_rows) == (40, 10)
    assert {"prompt", "completion", "row_hash"} <= set(latest["train"].column_names)
    pinned = sftflow.load_dataset("hf", first, bucket=s3.bucket)
    assert (pinned["train"].num_rows, pinned["validation"].num_rows) == (32, 8)
    assert second != first


def test_a_corrupted_shard_is_refused(s3):
    version = make_version(s3, "hf-bad", 20)
    m = load_manifest(s3, "hf-bad", version, verify=False)
    shard = m.files_of("parquet", "train")[0]
    s3.put_bytes(m.key(shard.path), b"not the bytes the manifest names")
    with pytest.raises(SftflowError, match="checksum mismatch"):
        sftflow.load_dataset("hf-bad", bucket=s3.bucket)


def test_the_bucket_and_a_pulled_folder_give_the_same_splits_and_rows(s3, tmp_path):
    import datasets

    version = make_version(s3, "hf-same", 50, eval_every=5)
    pull_version(s3, "hf-same", version, tmp_path / "pulled")
    remote = sftflow.load_dataset("hf-same", version, bucket=s3.bucket)
    local = datasets.load_dataset(str(tmp_path / "pulled"), cache_dir=str(tmp_path / "cache"))
    assert set(remote) == set(local) == {"train", "validation"}
    for split in ("train", "validation"):
        assert sorted(remote[split]["row_hash"]) == sorted(local[split]["row_hash"])
