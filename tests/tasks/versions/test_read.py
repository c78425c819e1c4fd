"""Listings of datasets and versions (tasks.versions.read) on the real SeaweedFS: a damaged
manifest is named (dataset, key, reason), never fatal to the listing of the others."""

from __future__ import annotations

import json

import pytest

from sftflow.core.errors import SftflowError
from sftflow.tasks.versions.read import list_versions, scan_datasets, scan_versions
from tests.tasks._finetune import make_version

pytestmark = pytest.mark.integration


def manifest_key(dataset: str, version: str) -> str:
    return f"datasets/{dataset}/versions/{version}/manifest.json"


@pytest.fixture()
def two_datasets(s3) -> dict[str, list[str]]:
    """Two real versions of each of two datasets (the second one is latest)."""
    return {name: [make_version(s3, name, 30), make_version(s3, name, 40, start=1)]
            for name in ("alpha", "beta")}


def _damage(s3, kind: str, dataset: str, version: str, other: str) -> str:
    """Overwrite ``version``'s manifest with one ``kind`` of damage; the reason expected."""
    key = manifest_key(dataset, version)
    good = json.loads(s3.get_bytes(key)[0])
    if kind == "garbage":
        body, reason = b"\x00 this is not a manifest {", "not valid JSON"
    elif kind == "model":
        body, reason = json.dumps({"dataset": dataset}).encode(), "refused: version"
    elif kind == "escaping-path":
        good["files"][0]["path"] = "../beta/shards/stolen.parquet"
        body, reason = json.dumps(good).encode(), "leaves the dataset root"
    else:  # another version's manifest copied over this one
        body, reason = s3.get_bytes(manifest_key(dataset, other))[0], f"not {dataset}@{version}"
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body)
    return reason


@pytest.mark.parametrize("kind", ["garbage", "model", "escaping-path", "other-version"])
def test_a_damaged_manifest_is_named_and_the_other_versions_are_listed(s3, two_datasets, kind):
    old, new = two_datasets["alpha"]
    reason = _damage(s3, kind, "alpha", old, new)
    listing = scan_versions(s3, "alpha")
    assert [v["version"] for v in listing.versions] == [new]
    assert [(d.dataset, d.key) for d in listing.damaged] == [("alpha", manifest_key("alpha", old))]
    assert reason in listing.damaged[0].reason
    assert listing.damaged[0].as_dict() == {"dataset": "alpha", "key": manifest_key("alpha", old),
                                            "reason": listing.damaged[0].reason}
    # The other dataset is untouched, and the strict reader names the damage.
    assert [v["version"] for v in list_versions(s3, "beta")] == two_datasets["beta"]
    with pytest.raises(SftflowError, match=manifest_key("alpha", old)):
        list_versions(s3, "alpha")


def test_the_dataset_listing_survives_a_damaged_latest_manifest(s3, two_datasets):
    old, new = two_datasets["alpha"]
    key = manifest_key("alpha", new)
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=b"garbage")
    listing = scan_datasets(s3)
    assert listing.datasets == [
        {"dataset": "alpha", "latest": new, "rows": None},
        {"dataset": "beta", "latest": two_datasets["beta"][1], "rows": {"train": 32, "eval": 8}},
    ]
    assert [(d.dataset, d.key) for d in listing.damaged] == [("alpha", key)]
    assert "not valid JSON" in listing.damaged[0].reason
    assert scan_versions(s3, "alpha").versions[0]["version"] == old


def test_a_clean_bucket_has_no_damage(s3, two_datasets):
    listing = scan_datasets(s3)
    assert [d["dataset"] for d in listing.datasets] == ["alpha", "beta"] and not listing.damaged
    assert not scan_versions(s3, "beta").damaged
