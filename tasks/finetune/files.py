"""Moving model folders between a local disk and an s3:// prefix, and small JSON objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftflow.tasks.storage import S3, parse_s3_uri


def upload_dir(s3: S3, local_dir: str | Path, uri: str) -> list[str]:
    """Upload every file under ``local_dir`` to the ``uri`` prefix; returns the s3:// URIs."""
    bucket, prefix = parse_s3_uri(uri.rstrip("/"))
    root = Path(local_dir)
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(root).as_posix()}"
        s3.client.upload_file(str(path), bucket, key)
        out.append(f"s3://{bucket}/{key}")
    return out


def download_prefix(s3: S3, uri: str, local_dir: str | Path) -> Path:
    """Download every object under the ``uri`` prefix into ``local_dir`` (same relative paths)."""
    bucket, prefix = parse_s3_uri(uri.rstrip("/"))
    root = Path(local_dir)
    n = 0
    for obj in s3.list(prefix + "/", bucket=bucket):
        dest = root / obj.key[len(prefix) + 1 :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.client.download_file(bucket, obj.key, str(dest))
        n += 1
    if n == 0:
        raise KeyError(uri)
    return root


def prefix_has(s3: S3, uri: str, name: str) -> bool:
    bucket, prefix = parse_s3_uri(uri.rstrip("/"))
    return s3.head(f"{prefix}/{name}", bucket=bucket) is not None


def read_json(s3: S3, uri: str) -> dict[str, Any]:
    """The JSON object at ``uri``; KeyError if absent."""
    bucket, key = parse_s3_uri(uri)
    data, _ = s3.get_bytes(key, bucket=bucket)
    return json.loads(data)


def write_json(s3: S3, uri: str, obj: Any) -> None:
    bucket, key = parse_s3_uri(uri)
    s3.put_bytes(key, json.dumps(obj, indent=2, default=str).encode(), bucket=bucket,
                 content_type="application/json")


def read_lines(s3: S3, uri: str) -> list[str]:
    bucket, key = parse_s3_uri(uri)
    data, _ = s3.get_bytes(key, bucket=bucket)
    return data.decode("utf-8").splitlines()
