"""A flow served as a deployment with sftflow's concurrency (one run at a time, the others
wait: ``ConcurrencyLimitConfig(limit=1, ENQUEUE)``, as ``build-dataset``, ``finetune`` and
``ingest`` have in ``deployments/serve.py``). A run writes ``<folder>/<tag>.started`` and holds
its slot until ``<folder>/<tag>.release`` exists. Run as a script: ``prefect.serve`` of that
deployment against ``PREFECT_API_URL`` (``tests/infra/test_prefect_slots.py``)."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, serve

FLOW, DEPLOYMENT = "slot-holder", "held"


@flow(name=FLOW)
def hold(folder: str, tag: str) -> str:
    started, release = Path(folder) / f"{tag}.started", Path(folder) / f"{tag}.release"
    started.write_text("running")
    while not release.exists():  # a stand-in for a long build: the slot is held meanwhile
        time.sleep(0.2)
    return tag


if __name__ == "__main__":
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    serve(hold.to_deployment(name=DEPLOYMENT, concurrency_limit=ConcurrencyLimitConfig(
        limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)))
