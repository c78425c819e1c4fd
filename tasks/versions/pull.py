"""``sftflow datasets pull``: a committed version downloaded into a local folder laid out as a
Hugging Face Hub dataset repository (layout and card: ``tasks/versions/hub.py``).

Every file is checksum-verified and written atomically (``.part``, then renamed); a file
already there with the right bytes is kept. Every destination must resolve inside the folder
(symlinks followed), or nothing is downloaded.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sftflow.core.errors import SftflowError
from sftflow.core.hashing import sha256_hex
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.versions import hub
from sftflow.tasks.versions.keys import DEFAULT_PREFIX, MANIFEST
from sftflow.tasks.versions.manifest import FileEntry, Manifest
from sftflow.tasks.versions.read import load_manifest, version_bytes


def _inside(dest: Path, relative: str, manifest: Manifest) -> Path:
    """``dest / relative``, refused unless it resolves inside ``dest``."""
    base = dest.resolve()
    out = dest / relative
    if not out.resolve().is_relative_to(base) or out.resolve() == base:
        raise SftflowError(
            f"{manifest.dataset}@{manifest.version}: file {relative!r} resolves outside "
            f"{dest} ({out.resolve()}); nothing was downloaded"
        )
    return out


def pull_version(s3: S3, dataset: str, version: str | None, dest: str | Path, *,
                 prefix: str = DEFAULT_PREFIX, license: str = hub.DEFAULT_LICENSE,
                 ) -> dict[str, Any]:
    """Download a version into ``dest`` as a Hub dataset repository (``tasks/versions/hub.py``:
    layout and card), checksums verified, files written atomically. Every file's destination
    must resolve inside ``dest`` (symlinks followed), or nothing is downloaded (SftflowError
    naming the file)."""
    manifest = load_manifest(s3, dataset, version, verify=False, prefix=prefix)
    dest = Path(dest)
    files = hub.pulled_files(manifest.files)
    targets = {f.path: _inside(dest, hub.local_path(f), manifest) for f in files}

    def fetch(f: FileEntry) -> int:
        out = targets[f.path]
        trimmed = bool(manifest.deleted.get(manifest.shard_of(f)))
        if (not trimmed and out.is_file() and out.stat().st_size == f.size
                and sha256_hex(out.read_bytes()) == f.sha256):
            return 0
        data = version_bytes(s3, manifest, f)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(out)
        return len(data)

    with ThreadPoolExecutor(8) as pool:
        downloaded = sum(pool.map(fetch, files))
    _inside(dest, MANIFEST, manifest).write_bytes(manifest.to_json())
    card = hub.write_card(_inside(dest, hub.CARD, manifest).parent, manifest, license=license)
    return {"dataset": dataset, "version": manifest.version, "dir": str(dest),
            "files": len(files) + 1, "bytes_downloaded": downloaded, "card": card}
