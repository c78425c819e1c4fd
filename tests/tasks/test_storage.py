"""The S3 client against the real local SeaweedFS."""

from __future__ import annotations

import pytest

from sftflow.tasks.storage import PreconditionFailed, parse_s3_uri

pytestmark = pytest.mark.integration


def test_put_get_list_paginates(s3):
    for i in range(1203):  # > 1000: list_objects_v2 returns several pages
        s3.client.put_object(Bucket=s3.bucket, Key=f"p/{i:05d}.txt", Body=b"x")
    keys = [o.key for o in s3.list("p/")]
    assert len(keys) == 1203 and keys[0] == "p/00000.txt" and keys[-1] == "p/01202.txt"
    assert s3.delete(keys) == 1203
    assert list(s3.list("p/")) == []


def test_if_none_match_creates_once(s3):
    etag = s3.put_bytes("refs/x", b"one", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        s3.put_bytes("refs/x", b"two", if_none_match=True)
    data, got = s3.get_bytes("refs/x")
    assert (data, got) == (b"one", etag)


def test_if_match_is_compare_and_swap(s3):
    first = s3.put_bytes("refs/latest", b"v1")
    second = s3.put_bytes("refs/latest", b"v2", if_match=first)
    with pytest.raises(PreconditionFailed):
        s3.put_bytes("refs/latest", b"v3", if_match=first)  # stale etag loses
    assert s3.get_bytes("refs/latest") == (b"v2", second)


def test_missing_objects(s3):
    assert s3.head("nope") is None
    with pytest.raises(KeyError):
        s3.get_bytes("nope")


def test_parse_s3_uri():
    assert parse_s3_uri("s3://b/a/b/") == ("b", "a/b/")
    assert parse_s3_uri("s3://b") == ("b", "")
    with pytest.raises(ValueError):
        parse_s3_uri("http://b/x")
