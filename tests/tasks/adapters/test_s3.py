"""The S3 client against the real local SeaweedFS."""

from __future__ import annotations

import pytest

from sftflow.tasks.adapters.s3 import PreconditionFailed, parse_s3_uri

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


def test_a_server_that_ignores_conditional_writes_is_refused(settings, s3):
    """Through a proxy that turns the server's 412 into 200 (as a server that ignores
    If-None-Match would answer), the first conditional write refuses, naming the server."""
    from urllib.parse import urlparse

    from sftflow.tasks.adapters.s3 import ConditionalWritesUnsupported, build_s3
    from tests.faults.proxy import Fault, FaultProxy

    up = urlparse(settings.s3.endpoint_url)
    with FaultProxy(up.hostname, up.port) as proxy:
        proxy.add(Fault("rewrite", method="PUT", from_status=412, status=200, times=0))
        client = build_s3(settings.s3.model_copy(update={"endpoint_url": proxy.url,
                                                         "bucket": s3.bucket}))
        client.put_bytes("plain", b"unconditional writes still work")
        with pytest.raises(ConditionalWritesUnsupported, match=proxy.url):
            client.put_bytes("refs/latest", b"v1", if_none_match=True)
        assert s3.head("refs/latest") is None  # nothing was committed
    assert [o.key for o in s3.list("_sftflow/probe/")] == []  # the probe cleaned up
    s3.put_bytes("refs/latest", b"v1", if_none_match=True)  # the real server passes the probe


def test_empty_key_id_uses_the_boto3_credential_chain(settings, s3, monkeypatch):
    """`SFTFLOW_S3__ACCESS_KEY_ID=` (the README's way to use boto3's chain) must not crash
    with PartialCredentialsError: the keys come from the environment instead."""
    from pydantic import SecretStr

    from sftflow.tasks.adapters.s3 import build_s3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", settings.s3.access_key_id.get_secret_value())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", settings.s3.secret_access_key.get_secret_value())
    client = build_s3(settings.s3.model_copy(update={"access_key_id": SecretStr(""),
                                                     "bucket": s3.bucket}))
    client.put_bytes("chain", b"ok")
    assert s3.get_bytes("chain")[0] == b"ok"


@pytest.mark.prefect
def test_keys_come_from_a_prefect_aws_credentials_block(settings, s3, prefect_harness):
    """`SFTFLOW_S3__CREDENTIALS_BLOCK` names a saved `AwsCredentials` block: its keys (and
    endpoint) are used, whatever key pair the settings carry; S3 and s3fs both get them."""
    import fsspec
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters
    from pydantic import SecretStr

    from sftflow.tasks.adapters.s3 import build_s3

    good = f"sftflow-s3-{s3.bucket}"
    AwsCredentials(
        aws_access_key_id=settings.s3.access_key_id.get_secret_value(),
        aws_secret_access_key=settings.s3.secret_access_key.get_secret_value(),
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=settings.s3.endpoint_url),
    ).save(good, overwrite=True)
    bad = f"sftflow-s3-bad-{s3.bucket}"
    AwsCredentials(aws_access_key_id="nobody", aws_secret_access_key="nothing",
                   aws_client_parameters=AwsClientParameters(
                       endpoint_url=settings.s3.endpoint_url)).save(bad, overwrite=True)
    # Wrong settings keys and no endpoint: only the block can make this work.
    wrong = settings.s3.model_copy(update={
        "access_key_id": SecretStr("wrong"), "secret_access_key": SecretStr("wrong"),
        "endpoint_url": None, "bucket": s3.bucket, "max_attempts": 0})

    client = build_s3(wrong.model_copy(update={"credentials_block": good}))
    client.put_bytes("from-block", b"ok")
    assert s3.get_bytes("from-block")[0] == b"ok"
    fs = fsspec.filesystem("s3", **client.fsspec_options())
    assert fs.cat(f"{s3.bucket}/from-block") == b"ok"

    refused = build_s3(wrong.model_copy(update={"credentials_block": bad}))
    with pytest.raises(Exception, match="InvalidAccessKeyId"):
        refused.put_bytes("from-bad-block", b"no")
    assert s3.head("from-bad-block") is None


def _behind_proxy(settings, s3, proxy):
    from sftflow.tasks.adapters.s3 import build_s3

    return build_s3(settings.s3.model_copy(update={"endpoint_url": proxy.url,
                                                   "bucket": s3.bucket}))


def test_the_probe_checks_if_match_and_the_real_server_passes(settings, s3):
    """The probe sends If-Match twice (a wrong ETag: 412 expected; the right one: written);
    a faultless proxy counts them, and the real SeaweedFS passes."""
    from urllib.parse import urlparse

    from tests.faults.proxy import Fault, FaultProxy

    up = urlparse(settings.s3.endpoint_url)
    with FaultProxy(up.hostname, up.port) as proxy:
        proxy.add(Fault("delay", method="PUT", header=r"^if-match:", seconds=0, times=0))
        _behind_proxy(settings, s3, proxy).check_conditional_writes()
        assert proxy.applied["delay"] == 2
    assert [o.key for o in s3.list("_sftflow/probe/")] == []


def test_a_server_that_ignores_if_match_is_refused(settings, s3):
    """A server that honours If-None-Match but ignores If-Match (the proxy turns the 412 of
    every PUT carrying If-Match into 200): refs, locks and lineage would lose updates there,
    so the first conditional write refuses, naming If-Match and the server."""
    from urllib.parse import urlparse

    from sftflow.tasks.adapters.s3 import ConditionalWritesUnsupported
    from tests.faults.proxy import Fault, FaultProxy

    up = urlparse(settings.s3.endpoint_url)
    with FaultProxy(up.hostname, up.port) as proxy:
        proxy.add(Fault("rewrite", method="PUT", header=r"^if-match:", from_status=412,
                        status=200, times=0))
        client = _behind_proxy(settings, s3, proxy)
        etag = client.put_bytes("refs/latest", b"v1")
        with pytest.raises(ConditionalWritesUnsupported, match=f"If-Match.*{proxy.url}|"
                                                               f"{proxy.url}.*If-Match"):
            client.put_bytes("refs/latest", b"v2", if_match=etag)
        with pytest.raises(ConditionalWritesUnsupported, match="If-Match"):
            client.put_bytes("refs/tags/new", b"v1", if_none_match=True)
    assert s3.get_bytes("refs/latest")[0] == b"v1" and s3.head("refs/tags/new") is None
    assert [o.key for o in s3.list("_sftflow/probe/")] == []
