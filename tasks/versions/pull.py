"""``sftflow datasets pull``: a committed version downloaded into a local folder laid out as a
Hugging Face Hub dataset repository (layout and card: ``tasks/versions/hub.py``).

The folder ends up holding exactly one version. A pull writes a marker, ``.sftflow-pull.json``
(dataset, version, bucket), and a later pull into the same folder replaces that pull whole:
the version is downloaded into a hidden sibling folder (``.<name>.sftflow-pull-<id>``), then
swapped in by two renames. A pull that fails or is killed while downloading leaves the earlier
pull as it was (and, when killed, its hidden sibling); killed between the two renames, it
leaves no folder and the two hidden siblings: never a mix of two versions. A non-empty folder
that holds no earlier pull is refused unless ``force`` (its contents are then replaced); an
empty or new folder is fine.

Every file is checksum-verified; a file of the earlier pull with the right bytes is reused
(hard-linked, else copied) instead of downloaded. Every destination must resolve inside the
folder (symlinks followed), or nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
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

#: The marker a pull leaves in its folder: which version the folder holds.
MARKER = ".sftflow-pull.json"


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


def earlier_pull(folder: str | Path) -> dict[str, str] | None:
    """``{"dataset", "version"}`` of the pull ``folder`` holds (its marker), None when it holds
    none (no marker, or one that does not read)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str)
                                             for k in ("dataset", "version")):
        return None
    return {"dataset": data["dataset"], "version": data["version"]}


def _check_dest(dest: Path, force: bool) -> dict[str, str] | None:
    """The earlier pull ``dest`` holds (None: none); refuses a file, and a non-empty folder
    that is no earlier pull unless ``force``."""
    if dest.exists() and not dest.is_dir():
        raise SftflowError(f"pull destination {dest} is not a folder")
    if not dest.exists() or next(dest.iterdir(), None) is None:
        return None
    earlier = earlier_pull(dest)
    if earlier is None and not force:
        raise SftflowError(
            f"pull destination {dest} is not empty and holds no earlier sftflow pull (no "
            f"readable {MARKER}); pull into a new or empty folder, or pass --force to replace "
            "its contents")
    return earlier


def _same_bytes(path: Path, f: FileEntry) -> bool:
    return (path.is_file() and path.stat().st_size == f.size
            and sha256_hex(path.read_bytes()) == f.sha256)


def _download(s3: S3, manifest: Manifest, files: list[FileEntry], staging: Path,
              previous: Path | None) -> int:
    """Write ``files`` under ``staging`` (checksums verified); a file ``previous`` already
    holds with the right bytes is linked or copied from there. Returns bytes downloaded."""

    def fetch(f: FileEntry) -> int:
        relative = hub.local_path(f)
        out = _inside(staging, relative, manifest)
        out.parent.mkdir(parents=True, exist_ok=True)
        trimmed = bool(manifest.deleted.get(manifest.shard_of(f)))
        old = previous / relative if previous is not None else None
        if not trimmed and old is not None and _same_bytes(old, f):
            try:
                os.link(old, out)
            except OSError:
                shutil.copyfile(old, out)
            return 0
        data = version_bytes(s3, manifest, f)
        out.write_bytes(data)
        return len(data)

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(fetch, files))


def _swap(staging: Path, real: Path) -> None:
    """Put the complete ``staging`` folder where ``real`` is (two renames; the old folder is
    removed after)."""
    if not real.exists():
        staging.rename(real)
        return
    old = real.with_name(f".{real.name}.sftflow-old-{uuid.uuid4().hex[:12]}")
    real.rename(old)
    try:
        staging.rename(real)
    except OSError:
        old.rename(real)  # the earlier pull back in place
        raise
    shutil.rmtree(old, ignore_errors=True)


def pull_version(s3: S3, dataset: str, version: str | None, dest: str | Path, *,
                 prefix: str = DEFAULT_PREFIX, license: str = hub.DEFAULT_LICENSE,
                 force: bool = False) -> dict[str, Any]:
    """Download a version into ``dest`` as a Hub dataset repository (``tasks/versions/hub.py``:
    layout and card), checksums verified, so that ``dest`` holds that version only: an
    earlier pull there is replaced whole, never mixed with it (see the module docstring). A
    non-empty ``dest`` holding no earlier pull is refused unless ``force``. Every file's
    destination must resolve inside ``dest`` (symlinks followed), or nothing is downloaded
    (SftflowError naming the file)."""
    manifest = load_manifest(s3, dataset, version, verify=False, prefix=prefix)
    dest = Path(dest)
    files = hub.pulled_files(manifest.files)
    for relative in [*(hub.local_path(f) for f in files), MANIFEST, hub.CARD, MARKER]:
        _inside(dest, relative, manifest)
    replaced = _check_dest(dest, force)
    real = dest.resolve()  # a symlinked folder: its target is what is replaced
    real.parent.mkdir(parents=True, exist_ok=True)
    staging = real.with_name(f".{real.name}.sftflow-pull-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        if real.is_dir():
            shutil.copymode(real, staging)
        downloaded = _download(s3, manifest, files, staging, real if real.is_dir() else None)
        (staging / MANIFEST).write_bytes(manifest.to_json())
        card = hub.write_card(staging, manifest, license=license)
        (staging / MARKER).write_text(json.dumps(
            {"dataset": dataset, "version": manifest.version, "bucket": s3.bucket}, indent=1),
            encoding="utf-8")
        _swap(staging, real)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"dataset": dataset, "version": manifest.version, "dir": str(dest),
            "files": len(files) + 1, "bytes_downloaded": downloaded, "card": card,
            "replaced": replaced}
