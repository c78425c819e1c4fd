"""Moving model folders between a local disk and an s3:// prefix, and small JSON objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftflow.core.errors import SftflowError
from sftflow.tasks.adapters.s3 import S3, parse_s3_uri


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


def local_path(root: Path, prefix: str, key: str) -> Path:
    """Where the object ``key`` listed under ``prefix`` goes in ``root``: its path relative to the
    prefix. Storage is not trusted: a key not under the prefix, without a file name, absolute
    once the prefix is cut, or with ``.``/``..`` segments (some S3 servers store them) is
    refused with an SftflowError naming it, so nothing is ever written outside ``root``."""
    rel = key[len(prefix) + 1:] if key.startswith(prefix + "/") else None
    parts = rel.split("/") if rel else []
    if not parts or any(part in ("", ".", "..") for part in parts) or "\\" in rel:
        raise SftflowError(f"refusing to download the object {key!r}: its path resolves outside the "
                           f"destination folder {root} (listed under {prefix!r})")
    dest = root.joinpath(*parts)
    if not dest.resolve().is_relative_to(root.resolve()):  # e.g. a symlink inside root
        raise SftflowError(f"refusing to download the object {key!r}: {dest} resolves outside the "
                           f"destination folder {root}")
    return dest


def download_prefix(s3: S3, uri: str, local_dir: str | Path) -> Path:
    """Download every object under the ``uri`` prefix into ``local_dir`` (same relative paths).
    Every listed key is checked (:func:`local_path`) before the first file is written."""
    bucket, prefix = parse_s3_uri(uri.rstrip("/"))
    root = Path(local_dir)
    targets = [(obj.key, local_path(root, prefix, obj.key)) for obj in s3.list(prefix + "/", bucket=bucket)]
    if not targets:
        raise KeyError(uri)
    for key, dest in targets:
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.client.download_file(bucket, key, str(dest))
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
