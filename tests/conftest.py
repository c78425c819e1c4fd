"""Shared fixtures: the real local stack (reused when already running), a fresh bucket per
test, a Label Studio client, a Prefect test harness, and the shared data folder."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sftflow.core.settings import Settings

SHARED_DATA = Path(os.environ.get("SFTFLOW_SHARED_DATA", Path(__file__).parents[1] / ".." / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[Settings]:
    """S3, Label Studio and the Prefect server, healthy. Reuses a running stack; stops only
    what it started. (Most Prefect tests use the harness; the crash tests need a real server.)"""
    from sftflow.infra.stack import LocalStack

    local = LocalStack(settings)
    needed = list(local.services)  # with SFTFLOW_STACK__POSTGRES=true, postgres too
    missing = [s.name for s in local.status(needed) if not s.healthy]
    if missing:
        local.up(missing)  # reuses a running-but-slow service; starts only what is not running
    yield settings
    if local.started:
        local.down(local.started)


@pytest.fixture()
def s3(stack: Settings):
    """An S3 client bound to a new, empty bucket of its own, deleted afterwards."""
    from sftflow.tasks.adapters.s3 import build_s3

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    client = build_s3(stack.s3.model_copy(update={"bucket": bucket}))
    client.ensure_bucket()
    yield client
    # A bucket is a SeaweedFS collection holding volumes: free them for the next tests.
    client.delete(o.key for o in client.list(""))
    with contextlib.suppress(Exception):  # not the test's subject: never fail a test here
        client.client.delete_bucket(Bucket=bucket)


@pytest.fixture(scope="session")
def labelstudio(stack: Settings):
    from sftflow.tasks.adapters.labelstudio import build_labelstudio

    return build_labelstudio(stack.labelstudio)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A real, ephemeral Prefect API (runs triggers and automations, not the scheduler)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
