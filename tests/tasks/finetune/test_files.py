"""The training worker's download of an s3:// model prefix (``tasks/finetune/files.py``): keys
listed by the storage are not trusted to stay inside the destination folder.

SeaweedFS refuses keys with ``..`` segments, but other S3 servers (AWS S3 among them) store and
list them. So the integration test puts a proxy in front of the real SeaweedFS of the local stack
that rewrites one key of the real ListObjectsV2 answer into a crafted one, as such a server
would list it; every other byte comes from SeaweedFS.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from sftflow.core.errors import SftflowError
from sftflow.tasks.adapters.s3 import build_s3
from sftflow.tasks.finetune import files
from sftflow.tasks.finetune.files import download_prefix
from tests.faults.proxy import FaultProxy

ROOT = Path("/tmp/dest")


@pytest.mark.parametrize("key, rel", [
    ("models/x/config.json", "config.json"),
    ("models/x/sub/weights.bin", "sub/weights.bin"),
    ("models/x/...", "..."),
    ("models/x/a..b/c", "a..b/c"),
])
def test_keys_under_the_prefix_map_inside_the_destination(key, rel):
    assert files.local_path(ROOT, "models/x", key) == ROOT / rel


@pytest.mark.parametrize("key", [
    "models/x/../../etc/passwd",
    "models/x/sub/../../../escape.txt",
    "models/x/..",
    "models/x//etc/passwd",  # an absolute path once the prefix is cut
    "models/x/",  # a folder marker: no file name
    "models/y/config.json",  # not under the prefix at all
    "models/x/a/./b",
])
def test_keys_resolving_outside_the_destination_are_refused_naming_the_key(key):
    with pytest.raises(SftflowError, match="refusing .*" + key.replace(".", r"\.").replace("/", "/")):
        files.local_path(ROOT, "models/x", key)


class _ListingRewriter(FaultProxy):
    """Forwards to the real SeaweedFS; in ListObjectsV2 answers, replaces ``<Key>{old}</Key>``
    by ``<Key>{new}</Key>`` (the crafted key a ``..``-accepting S3 server would list)."""

    old = new = ""

    @classmethod
    async def _read_response(cls, reader, method):
        response = await FaultProxy._read_response(reader, method)
        if response is None or b"<ListBucketResult" not in response.body:
            return response
        body = response.body.replace(f"<Key>{cls.old}</Key>".encode(), f"<Key>{cls.new}</Key>".encode())
        assert "content-length" in response.headers, "a chunked listing: not rewritten"
        head = response.head.replace(f"Content-Length: {len(response.body)}".encode(),
                                     f"Content-Length: {len(body)}".encode())
        response.head, response.body = head, body
        return response


@pytest.mark.integration
@pytest.mark.parametrize("crafted", [
    "models/x/sub/../../../outside/escape.txt",
    "models/x/../../outside/escape.txt",
])
def test_a_listed_key_escaping_the_destination_is_refused_before_anything_is_written(
        s3, stack, tmp_path, crafted):
    s3.put_bytes("models/x/config.json", b"{}")
    s3.put_bytes("models/x/sub/placeholder.txt", b"payload")
    up = urlparse(stack.s3.endpoint_url)
    proxy_cls = type("Rewriter", (_ListingRewriter,), {"old": "models/x/sub/placeholder.txt", "new": crafted})
    with proxy_cls(up.hostname, up.port) as proxy:
        via_proxy = build_s3(stack.s3.model_copy(update={"bucket": s3.bucket, "endpoint_url": proxy.url}))
        assert crafted in [o.key for o in via_proxy.list("models/x/")]  # as such a server lists it
        dest = tmp_path / "cache" / "model"
        with pytest.raises(SftflowError, match=f"refusing .*{crafted.replace('.', '[.]')}.*outside"):
            download_prefix(via_proxy, s3.uri("models/x"), dest)
    assert not (tmp_path / "outside").exists() and not (tmp_path / "cache" / "outside").exists()
    assert not dest.exists() or not any(dest.rglob("*"))  # refused before the first write

    good = download_prefix(s3, s3.uri("models/x"), tmp_path / "ok")  # without the proxy: all fine
    assert sorted(p.relative_to(good).as_posix() for p in good.rglob("*") if p.is_file()) == [
        "config.json", "sub/placeholder.txt"]
