"""Backend ``trl``: the ``train-trl`` flow, run as its own deployment on a work pool.

``submit`` creates a flow run of the deployment (``settings.finetune.trl_deployment``) with the
job name as Prefect idempotency key, so submitting the same job twice returns the same run;
``status`` maps the run's Prefect state; ``cancel`` moves it to Cancelling; ``result`` reads the
``result.json`` the training flow wrote next to the model.

With ``settings.finetune.trl_mode = "local"`` (demo, no worker) ``submit`` calls ``run_local``
(the caller passes the training flow: this layer does not import flows) in this process and
returns when it ends; ``status`` then reads ``result.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sftflow.core.errors import ConfigError, SftflowError
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.finetune.backends import JobResult, JobSpec, JobStatus
from sftflow.tasks.finetune.trl_job import read_result, result_uri

if TYPE_CHECKING:
    from sftflow.tasks.adapters.clients import Clients

LOCAL_PREFIX = "local:"

_PREFECT_STATES = {
    "SCHEDULED": "queued",
    "PENDING": "queued",
    "PAUSED": "queued",
    "RUNNING": "running",
    "CANCELLING": "running",
    "COMPLETED": "succeeded",
    "FAILED": "failed",
    "CRASHED": "failed",
    "CANCELLED": "cancelled",
}


def map_prefect_state(state_type: str) -> str:
    return _PREFECT_STATES.get(state_type.upper(), "running")


class TrlBackend:
    name = "trl"
    #: Its status is a flow run's state on our own Prefect API: cheap to read. With the old 60 s
    #: cap a local training that ended was noticed up to ~40 s late (the demo's second round).
    poll_max_s = 5.0

    def __init__(self, s3: S3, mode: str = "deployment", deployment: str = "train-trl/default",
                 run_local: Callable[[JobSpec], Any] | None = None):
        self.s3 = s3
        self.mode = mode
        self.deployment = deployment
        self.run_local = run_local

    @classmethod
    def from_clients(cls, clients: Clients, run_local: Callable[[JobSpec], Any] | None = None) -> TrlBackend:
        ft = clients.settings.finetune
        return cls(clients.s3, ft.trl_mode, ft.trl_deployment, run_local)

    def preflight(self, spec: JobSpec) -> dict[str, Any]:
        from sftflow.tasks.finetune.training import base_model_kind

        if not spec.chat_train_files:
            raise SftflowError(f"{spec.dataset}@{spec.version} has no openai_chat train files: "
                               "the trl backend trains on them")
        checks = {"base_model": base_model_kind(self.s3, spec.base_model)}
        if self.mode == "deployment":
            checks["deployment"] = self._check_deployment()
        return checks

    def _check_deployment(self) -> str:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                dep = client.read_deployment_by_name(self.deployment)
            except ObjectNotFound:
                raise SftflowError(
                    f"training deployment {self.deployment!r} not found on the Prefect API: "
                    "register it with `sftflow trainer deploy` (and start a worker), or set "
                    "SFTFLOW_FINETUNE__TRL_MODE=local"
                ) from None
        return f"{self.deployment} on pool {dep.work_pool_name}"

    def submit(self, spec: JobSpec) -> str:
        if self.mode == "local":
            if self.run_local is None:
                raise ConfigError("trl_mode = 'local' needs a local training runner (run_local)")
            self.run_local(spec)  # a failure is read back through status()
            return LOCAL_PREFIX + result_uri(spec)
        from prefect.deployments import run_deployment

        run = run_deployment(
            name=self.deployment,
            parameters={"params": spec.model_dump(mode="json")},
            timeout=0,
            idempotency_key=spec.job,
            flow_run_name=spec.job,
            tags=["sftflow", "train", f"dataset:{spec.dataset}"],
        )
        return str(run.id)

    def status(self, backend_job_id: str) -> JobStatus:
        if backend_job_id.startswith(LOCAL_PREFIX):
            return self._local_status(backend_job_id)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            run = client.read_flow_run(backend_job_id)
        state_type = run.state.type.value if run.state else "PENDING"
        state = map_prefect_state(state_type)
        error = None
        if state in ("failed", "cancelled"):
            error = (run.state.message if run.state else None) or f"flow run {state_type.lower()}"
        return JobStatus(backend_job_id=backend_job_id, state=state, error=error, detail=state_type)

    def _local_status(self, backend_job_id: str) -> JobStatus:
        uri = backend_job_id[len(LOCAL_PREFIX):]
        result = read_result(self.s3, uri)
        if result is None:
            return JobStatus(backend_job_id=backend_job_id, state="failed",
                             error=f"the local training run wrote no {uri}")
        return JobStatus(backend_job_id=backend_job_id, state=result.status,
                         error=result.error, detail=result.status)

    def cancel(self, backend_job_id: str) -> None:
        if backend_job_id.startswith(LOCAL_PREFIX):
            return
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelling

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(backend_job_id, Cancelling(message="cancelled by sftflow"))

    def result(self, backend_job_id: str, spec: JobSpec) -> JobResult:
        uri = result_uri(spec)
        data = read_result(self.s3, uri)
        if data is None:
            raise SftflowError(f"training job {spec.job} finished without a result: no {uri}")
        return JobResult(metrics=data.metrics or {}, artifacts=data.artifacts or {},
                         history=data.history or [], training_record=data.training_record,
                         few_shot=data.few_shot)
