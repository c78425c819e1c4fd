"""Test helpers for fine-tuning: real dataset versions, a tiny local base model, a Prefect
worker running the ``train-trl`` deployment, and the settings the flow reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sftflow.tasks.runtime.polling import Backoff, wait_until
from sftflow.tasks.versions.commit import CommitRequest, commit_version
from tests.tasks._datasets import final_rows

ROOT = Path(__file__).parents[2]


def make_version(s3, dataset: str, n: int = 40, *, eval_every: int = 5, tag: str = "",
                 start: int = 0) -> str:
    """Commit ``n`` rows (every ``eval_every``-th in eval) as a real version; returns its id."""
    rows = final_rows(n, start=start, eval_every=eval_every, tag=tag)
    res = commit_version(s3, CommitRequest(
        dataset=dataset, rows=rows, config={"eval_fraction": 1 / eval_every},
        source={"project_id": 1, "snapshot_at": f"2026-01-0{1 + start % 9}T00:00:00",
                "num_tasks_with_annotations": n},
        stats={"filters": {"kept": n}}, shard_rows=1000,
    ))
    return res.version


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama-style model whose tokenizer learnt the test rows' vocabulary."""
    from sftflow.tasks.finetune.tiny_model import build_tiny_model

    texts = [r["prompt"] + " " + r["completion"] for r in final_rows(200)]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), texts)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """The same tiny model with a chat template (``build_tiny_model(chat=True)``)."""
    from sftflow.tasks.finetune.tiny_model import build_tiny_model

    texts = [r["prompt"] + " " + r["completion"] for r in final_rows(200)]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat-model"), texts, chat=True)


@pytest.fixture()
def flow_settings(monkeypatch, s3):
    """Point the flow's settings at the test bucket (the flow reads the cached settings)."""
    from sftflow.core.settings import get_settings

    def apply(**env: str) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()

    apply(SFTFLOW_S3__BUCKET=s3.bucket)
    yield apply
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def train_worker(prefect_harness, tmp_path_factory) -> Iterator[str]:
    """``train-trl/default`` deployed on a new process work pool of the test harness's API,
    with a ``prefect worker`` subprocess serving it; the worker is stopped by its pid."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from sftflow.deployments.trainer import deploy_train_trl

    pool = f"train-test-{uuid.uuid4().hex[:8]}"
    deploy_train_trl(pool, "default", source=ROOT)
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", pool,
             "--type", "process"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )
    try:
        # Ready once it has registered with its pool (its first heartbeat), which it does as it
        # starts polling; a worker that exits is reported at once, with its log.
        def registered() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"prefect worker exited: {log.read_text()[-2000:]}")
            with get_client(sync_client=True) as client:
                return bool(client.read_workers_for_work_pool(work_pool_name=pool))

        if not wait_until(registered, timeout_s=120, backoff=Backoff(0.2, 1.0)):
            pytest.fail(f"prefect worker not registered with {pool} after 120 s: "
                        f"{log.read_text()[-2000:]}")
        yield pool
    finally:  # the worker and the flow-run processes it spawned: the group this fixture started
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
