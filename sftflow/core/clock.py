"""The one clock of records (manifests, ledgers, lineage): timezone-aware UTC, ISO 8601."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def utc_now_iso() -> str:
    return utc_now().isoformat()
