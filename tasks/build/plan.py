"""What a build starts from: the parent version (``refs/latest``) as the next build needs it,
and the mode, with the reason for it.

``scratch`` without a usable parent (none, another build config, or one without a task
index) or when asked; ``full`` when asked or every ``full_every`` builds; else
``incremental`` (which may still fall back to a full export, see ``build.changes``). Reads
the parent from S3.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sftflow.core.hashing import config_hash
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.build.incremental import ParentState, incremental_ready, load_parent
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.versions.read import load_manifest
from sftflow.tasks.versions.refs import latest_version

BuildMode = Literal["incremental", "full", "scratch"]


@dataclass
class Plan:
    """What a build starts from: its parent (empty for a first build or a scratch build),
    the mode asked for, and why."""

    mode: BuildMode
    reason: str
    parent: ParentState
    since_full: int = 0  # builds since the last full export, this one included


def plan_build(s3: S3, dataset: str, prefix: str, config: Mapping[str, Any], *,
               mode: Literal["auto", "full", "scratch"], full_every: int) -> Plan:
    """The parent version and the mode: ``scratch`` without a usable parent (none, another
    build config, or one without a task index), ``full`` when asked or every ``full_every``
    builds, else ``incremental`` (which may still fall back to full, see ``read_changes``)."""
    latest = latest_version(s3, dataset, prefix=prefix)
    if latest is None:
        return Plan("scratch", "first version", ParentState(version=""))
    manifest = load_manifest(s3, dataset, latest, verify=False, prefix=prefix)
    if mode == "scratch":
        return Plan("scratch", "asked for (--scratch)", ParentState(version=""))
    if manifest.config_hash != config_hash(dict(config)):
        return Plan("scratch", f"build config differs from parent {latest}'s",
                    ParentState(version=""))
    if (why := incremental_ready(manifest)) is not None:
        return Plan("scratch", why, ParentState(version=""))
    parent = load_parent(s3, manifest)
    since = int(parent.source.get("since_full", 0) or 0) + 1
    if mode == "full":
        return Plan("full", "asked for (--full)", parent, 0)
    if since >= full_every:
        return Plan("full", f"every {full_every} builds", parent, 0)
    return Plan("incremental", "", parent, since)


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
plan_build_task = io_task(name="plan-build")(plan_build)
