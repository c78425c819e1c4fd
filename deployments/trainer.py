"""The ``train-trl/<name>`` deployment on a process work pool: where the ``trl`` backend's
training runs (``sftflow trainer deploy``, the demo, the tests).

Production pools (Kubernetes or Docker, with GPU job variables) use an image instead, see
``infra/k8s/``.
"""

from __future__ import annotations

from pathlib import Path

#: The training flow, as a path from the project root (what a worker imports).
ENTRYPOINT = "flows/train_trl.py:train_trl"


def deploy_train_trl(work_pool: str, name: str = "default", source: str | Path | None = None) -> str:
    """Register the training flow as ``train-trl/<name>`` on a process work pool.

    The pool is created when missing. ``source`` is the project folder the worker imports the
    flow from (default: this checkout). Its runs emit heartbeats, and the zombie automation is
    ensured (deployments/zombies.py). Returns the deployment id. Start a worker with
    ``prefect worker start --pool <work_pool>``.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    from sftflow.deployments.zombies import ensure_zombie_automation, heartbeat_env
    from sftflow.flows.train_trl import train_trl

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=work_pool,
                    type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
        except ObjectAlreadyExists:
            pass
    root = Path(source) if source else Path(__file__).resolve().parents[1]
    deployable = train_trl.from_source(source=str(root), entrypoint=ENTRYPOINT)
    dep_id = deployable.deploy(
        name=name,
        work_pool_name=work_pool,
        build=False,
        push=False,
        print_next_steps=False,
        description="TRL supervised fine-tuning of one sftflow job (see flows/train_trl.py).",
        tags=["sftflow", "train"],
        job_variables={"env": heartbeat_env()},  # a killed training process ends Crashed
    )
    ensure_zombie_automation()
    return str(dep_id)
