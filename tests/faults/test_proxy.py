"""The fault proxy itself, in front of the real SeaweedFS and Label Studio: it forwards
faithfully (signed S3 requests still verify) and injects exactly the faults it is told."""

from __future__ import annotations

from urllib.parse import urlparse

import httpx
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

from sftflow.tasks.adapters.s3 import build_s3
from tests.faults.proxy import Fault, FaultProxy

pytestmark = pytest.mark.integration


def proxied_s3(settings, s3, proxy: FaultProxy, **s3_settings):
    cfg = settings.s3.model_copy(update={"endpoint_url": proxy.url, "bucket": s3.bucket,
                                         "max_attempts": 0, **s3_settings})
    return build_s3(cfg)


@pytest.fixture()
def s3_proxy(stack, s3):
    up = urlparse(stack.s3.endpoint_url)
    with FaultProxy(up.hostname, up.port) as proxy:
        yield proxy


def test_forwards_signed_requests_byte_for_byte(settings, s3, s3_proxy):
    client = proxied_s3(settings, s3, s3_proxy)
    client.put_bytes("a/x", b"hello" * 1000)
    assert client.get_bytes("a/x")[0] == b"hello" * 1000
    assert client.head("a/x").size == 5000 and client.head("a/missing") is None
    assert [o.key for o in client.list("a/")] == ["a/x"]
    assert s3_proxy.requests >= 5 and not s3_proxy.applied


def test_lost_response_after_the_work_was_done(settings, s3, s3_proxy):
    client = proxied_s3(settings, s3, s3_proxy)
    s3_proxy.add(Fault("lose_response", method="PUT", path="/b/x", status=504))
    with pytest.raises(ClientError) as err:
        client.put_bytes("b/x", b"landed")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 504
    assert s3.get_bytes("b/x")[0] == b"landed"  # the server did the work
    s3_proxy.add(Fault("lose_response", method="PUT", path="/b/y", status=None))
    with pytest.raises(ConnectionClosedError):
        client.put_bytes("b/y", b"landed too")
    assert s3.get_bytes("b/y")[0] == b"landed too"
    assert s3_proxy.applied["lose_response"] == 2


def test_slow_response_outlives_the_client_timeout(settings, s3, s3_proxy):
    client = proxied_s3(settings, s3, s3_proxy, read_timeout_s=1.0)
    s3_proxy.add(Fault("slow_response", method="PUT", path="/c/x", seconds=3))
    with pytest.raises(ReadTimeoutError):
        client.put_bytes("c/x", b"late")
    assert s3.get_bytes("c/x")[0] == b"late"


def test_status_and_reset_never_reach_the_server(settings, s3, s3_proxy):
    client = proxied_s3(settings, s3, s3_proxy)
    s3_proxy.add(Fault("status", method="PUT", status=503, times=1))
    with pytest.raises(ClientError):
        client.put_bytes("d/x", b"never")
    assert s3.head("d/x") is None
    s3_proxy.add(Fault("reset", method="PUT"))
    with pytest.raises(ConnectionClosedError):
        client.put_bytes("d/y", b"never")
    assert s3.head("d/y") is None


def test_in_front_of_label_studio(stack):
    up = urlparse(stack.labelstudio.url)
    token = stack.labelstudio.api_key.get_secret_value()
    with FaultProxy(up.hostname, up.port) as proxy:
        headers = {"Authorization": f"Token {token}"}
        assert httpx.get(f"{proxy.url}/api/projects", headers=headers).status_code == 200
        proxy.add(Fault("status", path="^/api/projects", status=502))
        assert httpx.get(f"{proxy.url}/api/projects", headers=headers).status_code == 502
        assert httpx.get(f"{proxy.url}/health").json()["status"] == "UP"


def test_a_fault_can_match_a_request_header(settings, s3, s3_proxy):
    """``header``: a regex over the request's header lines (ignoring case); here only the
    PUTs carrying ``If-Match`` are hurt, the others pass untouched."""
    client = proxied_s3(settings, s3, s3_proxy)
    etag = client.put_bytes("h/x", b"one")
    s3_proxy.add(Fault("status", method="PUT", header=r"^if-match:", status=503))
    etag = client.put_bytes("h/x", b"two")  # no If-Match: not matched
    with pytest.raises(ClientError) as err:
        client.client.put_object(Bucket=s3.bucket, Key="h/x", Body=b"three", IfMatch=etag)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert s3.get_bytes("h/x")[0] == b"two"  # the server never saw it
    assert s3_proxy.applied["status"] == 1


def test_a_500_after_label_studio_did_the_work(stack, labelstudio):
    """``lose_response`` with ``status=500``: the import reaches Label Studio and commits, the
    client is told 500 (what a server failing after its commit looks like)."""
    from sftflow.tasks.ingest.projects import SFT_LABEL_CONFIG
    from tests.conftest import unique

    up = urlparse(stack.labelstudio.url)
    token = stack.labelstudio.api_key.get_secret_value()
    project = labelstudio.projects.create(title=unique("t-proxy"), label_config=SFT_LABEL_CONFIG)
    try:
        with FaultProxy(up.hostname, up.port) as proxy:
            proxy.add(Fault("lose_response", method="POST", path=r"/import", status=500))
            r = httpx.post(f"{proxy.url}/api/projects/{project.id}/import",
                           json=[{"prompt": "landed anyway"}],
                           headers={"Authorization": f"Token {token}"}, timeout=60)
            assert r.status_code == 500 and proxy.applied["lose_response"] == 1
        assert labelstudio.projects.get(id=project.id).task_number == 1
    finally:
        labelstudio.projects.delete(id=project.id)
