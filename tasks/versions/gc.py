"""Garbage collection of a dataset root: the objects no manifest and no ref references.

Only objects older than a minimum age are collected, and that age has a floor, the retention
floor (``MIN_AGE_FLOOR_S``, one hour; ``SFTFLOW_DATASETS__GC_MIN_AGE_FLOOR_S`` for the CLI):
a younger unreferenced object may be a build's in progress, so ``gc`` refuses a lower age
rather than trusting every caller to know it.

Safe beside a build: a commit re-puts every object it is about to reference (its age
restarts), and right before deleting, ``gc`` re-reads the manifests (a commit may have written
one since the listing) and checks each candidate's age again. What is left, a build writing
its manifest within the instant between that check and the delete, is repaired by the build's
own check of its files after its manifest (``commit.commit_version``). References resolve
under the root collected, never under the root written in a manifest.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from sftflow.core.clock import utc_now
from sftflow.core.errors import SftflowError
from sftflow.core.failpoints import failpoint
from sftflow.core.settings import DatasetSettings
from sftflow.tasks.adapters.s3 import S3, ObjectInfo
from sftflow.tasks.versions.keys import DEFAULT_PREFIX, DatasetKeys
from sftflow.tasks.versions.manifest import manifest_at

#: The lowest ``min_age_s`` gc accepts unless its caller sets a floor explicitly.
MIN_AGE_FLOOR_S: float = DatasetSettings.model_fields["gc_min_age_floor_s"].default


def _referenced(s3: S3, keys: DatasetKeys, manifest_keys: Iterable[str]) -> set[str]:
    """The object keys the manifests at ``manifest_keys`` reference (themselves included),
    located under the root being collected, never the root written in a manifest."""
    out = set()
    for key in manifest_keys:
        m = manifest_at(s3, key, keys.root)
        out.add(key)
        out.update(m.key(f.path) for f in m.files)
    return out


def _manifest_keys(s3: S3, keys: DatasetKeys) -> set[str]:
    return {o.key for o in s3.list(keys.versions) if keys.is_manifest(o.key)}


def check_min_age(min_age_s: float, min_age_floor_s: float = MIN_AGE_FLOOR_S) -> None:
    """Refuse a minimum age below the retention floor (SftflowError naming the floor)."""
    if not min_age_s >= min_age_floor_s:  # NaN refused too
        raise SftflowError(
            f"gc: a minimum age of {min_age_s:g} s is below the retention floor of "
            f"{min_age_floor_s:g} s (an unreferenced object younger than that may belong to a "
            "build in progress); use --min-age-s >= the floor, or lower the floor deliberately "
            "with SFTFLOW_DATASETS__GC_MIN_AGE_FLOOR_S")


def gc(s3: S3, dataset: str, *, prefix: str = DEFAULT_PREFIX, dry_run: bool = True,
       min_age_s: float = MIN_AGE_FLOOR_S,
       min_age_floor_s: float = MIN_AGE_FLOOR_S) -> dict[str, Any]:
    """Objects under the dataset root that no manifest and no ref references, older than
    ``min_age_s``. Deleted unless dry run. ``min_age_s`` below ``min_age_floor_s`` (the
    retention floor; the CLI passes the setting, tests an explicit lower one) is refused before
    anything is listed. A manifest that does not validate stops the collection (nothing is
    deleted). Trimmed copies (``derived/<version>/``) live as long as their version; see the
    module docstring for builds running meanwhile."""
    check_min_age(min_age_s, min_age_floor_s)
    keys = DatasetKeys.of(prefix, dataset)
    objects = list(s3.list(keys.everything))
    manifests = {o.key for o in objects if keys.is_manifest(o.key)}
    referenced = _referenced(s3, keys, manifests)
    cutoff = utc_now() - timedelta(seconds=min_age_s)

    live = {DatasetKeys.version_of_manifest(k) for k in manifests}

    def collectable(o: ObjectInfo) -> bool:
        if o.key.startswith(keys.derived):  # trimmed copies live as long as their version
            return keys.derived_version(o.key) not in live
        return (o.key not in referenced and not o.key.startswith(keys.refs)
                and (o.last_modified is None or o.last_modified <= cutoff))

    garbage = [o for o in objects if collectable(o)]
    young = [o for o in objects if o.key not in referenced and o not in garbage
             and not o.key.startswith(keys.refs)]
    deleted = 0
    if not dry_run and garbage:
        failpoint("gc.before-delete")
        referenced |= _referenced(s3, keys, _manifest_keys(s3, keys) - manifests)
        cutoff = utc_now() - timedelta(seconds=min_age_s)
        with ThreadPoolExecutor(8) as pool:
            now = list(pool.map(lambda o: s3.head(o.key), garbage))
        doomed = [o.key for o in now if o is not None and collectable(o)]
        deleted = s3.delete(doomed) if doomed else 0
    return {
        "dataset": dataset, "dry_run": dry_run, "versions": len(manifests),
        "objects": len(objects), "unreferenced": len(garbage),
        "unreferenced_bytes": sum(o.size for o in garbage),
        "kept_too_young": len(young), "deleted": deleted,
        "keys": [o.key for o in garbage[:50]],
    }
