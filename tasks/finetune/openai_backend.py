"""Backend ``openai``: the OpenAI fine-tuning API, or any compatible provider (base URL setting).

``preflight`` downloads the version's chat JSONL (``openai/train.jsonl``, ``openai/eval.jsonl``)
and validates it locally; ``submit`` uploads the files (``POST /files``, purpose ``fine-tune``)
and creates the job (``POST /fine_tuning/jobs``) with ``metadata.sftflow_job`` set, after looking
for an existing job with that metadata so a rerun never starts a second job; the creation POST
is never resent blindly: after a timeout or a 5xx the job is looked up again first (the lost
answer may hide a created job), and only resent when it is not found; ``status`` maps the
job's status; ``result`` reads ``fine_tuned_model``, result files and the metrics events.
Plain httpx: the ``openai`` package is not a dependency. The API key never reaches logs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from sftflow.core.errors import ConfigError, ServiceUnavailable, SftflowError
from sftflow.core.settings import resolve_secret
from sftflow.core.urls import redact_url
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.finetune.backends import JobResult, JobSpec, JobStatus
from sftflow.tasks.finetune.files import read_lines
from sftflow.tasks.finetune.validate import validate_chat_lines
from sftflow.tasks.runtime.polling import Backoff, retry

if TYPE_CHECKING:
    from sftflow.tasks.adapters.clients import Clients

_STATES = {
    "validating_files": "queued",
    "queued": "queued",
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}


class _HttpStatusError(Exception):
    """A non-2xx answer; ``status_code`` lets ``is_transient`` retry 408/429/5xx and no other."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code


class OpenAIBackend:
    name = "openai"
    poll_max_s = 60.0  # a remote API with rate limits: jobs take minutes to hours

    def __init__(self, s3: S3, base_url: str, api_key: str | None, *, timeout_s: float = 60.0,
                 attempts: int = 4, min_examples: int = 10, max_tokens_per_example: int = 65_536,
                 retry_delay_s: tuple[float, float] = (0.5, 30.0)):
        if not api_key:
            raise ConfigError(
                "OpenAI API key is not set (SFTFLOW_FINETUNE__OPENAI_API_KEY or "
                "SFTFLOW_FINETUNE__OPENAI_API_KEY_BLOCK)"
            )
        self.s3 = s3
        self.base_url = base_url.rstrip("/")
        self.where = redact_url(self.base_url)  # what errors name: no credential of the URL
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s  # first and longest pause between attempts
        self.min_examples = min_examples
        self.max_tokens_per_example = max_tokens_per_example
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
            transport=httpx.HTTPTransport(retries=2),  # connection errors only
        )

    @classmethod
    def from_clients(cls, clients: Clients) -> OpenAIBackend:
        ft = clients.settings.finetune
        key = resolve_secret(ft.openai_api_key, ft.openai_api_key_block)
        return cls(clients.s3, ft.openai_base_url, key)

    # -- HTTP ----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, *,
                 before_retry: Callable[[], dict[str, Any] | None] | None = None,
                 **kwargs: Any) -> dict[str, Any]:
        """JSON of a 2xx answer; timeouts, dropped connections, 408, 429 and 5xx are retried
        with exponential backoff and jitter, other answers fail at once with the API's message.

        ``before_retry`` is called before every resend: an answer it returns is taken instead
        (a request that is not idempotent looks up what its lost attempt may have done)."""
        attempt = 0

        def once() -> dict[str, Any]:
            nonlocal attempt
            attempt += 1
            if attempt > 1 and before_retry is not None and (found := before_retry()) is not None:
                return found
            resp = self._http.request(method, path, **kwargs)
            if resp.status_code >= 400:
                raise _HttpStatusError(resp.status_code, f"fine-tuning API {method} {self.where}{path}: "
                                                         f"{resp.status_code} {_error_message(resp)}")
            return resp.json()

        try:
            return retry(once, attempts=self.attempts, backoff=Backoff(*self.retry_delay_s))
        except httpx.HTTPError as err:
            raise ServiceUnavailable(f"fine-tuning API at {self.where}: {err}") from err
        except _HttpStatusError as err:
            raise SftflowError(str(err)) from None

    # -- protocol ------------------------------------------------------------------------------
    def preflight(self, spec: JobSpec) -> dict[str, Any]:
        if not spec.chat_train_files:
            raise SftflowError(f"{spec.dataset}@{spec.version} has no openai_chat train file")
        out: dict[str, Any] = {}
        for split, uris, minimum in (("train", spec.chat_train_files, self.min_examples),
                                     ("eval", spec.chat_eval_files, 1)):
            if not uris:
                continue
            lines = [line for uri in uris for line in read_lines(self.s3, uri)]
            report = validate_chat_lines(lines, min_examples=minimum,
                                         max_tokens_per_example=self.max_tokens_per_example)
            out[split] = report.as_dict()
            if not report.ok:
                reasons = ", ".join(f"{n} x {r}" for r, n in report.errors.items())
                raise SftflowError(f"chat JSONL of {spec.dataset}@{spec.version} ({split}) "
                                   f"failed validation: {reasons}; first: {report.samples[:3]}")
        return out

    def find_job(self, job: str) -> dict[str, Any] | None:
        """An existing fine-tuning job whose ``metadata.sftflow_job`` is ``job``."""
        after = None
        for _ in range(100):  # at most 10,000 jobs are scanned
            params: dict[str, Any] = {"limit": 100, "metadata[sftflow_job]": job}
            if after:
                params["after"] = after
            page = self._request("GET", "/fine_tuning/jobs", params=params)
            for item in page.get("data", []):
                if (item.get("metadata") or {}).get("sftflow_job") == job:
                    return item
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page["data"][-1]["id"]
        return None

    def _upload(self, name: str, uris: list[str]) -> str:
        data = "".join(line + "\n" for uri in uris for line in read_lines(self.s3, uri) if line.strip())
        file = self._request("POST", "/files", data={"purpose": "fine-tune"},
                             files={"file": (name, data.encode("utf-8"), "application/jsonl")})
        return str(file["id"])

    def submit(self, spec: JobSpec) -> str:
        existing = self.find_job(spec.job)
        if existing:
            return str(existing["id"])
        hp = spec.hyperparameters
        body: dict[str, Any] = {
            "model": spec.base_model,
            "training_file": self._upload(f"{spec.job}-train.jsonl", spec.chat_train_files),
            "suffix": spec.job[-18:],
            "seed": hp.seed,
            "metadata": {"sftflow_job": spec.job, "dataset": spec.dataset, "version": spec.version},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": max(1, round(hp.epochs)),
                "batch_size": hp.batch_size,
            }}},
        }
        if spec.chat_eval_files:
            body["validation_file"] = self._upload(f"{spec.job}-eval.jsonl", spec.chat_eval_files)
        # Never resent blindly: a lost answer (timeout, 5xx) may hide a created, paid job.
        created = self._request("POST", "/fine_tuning/jobs", json=body,
                                before_retry=lambda: self.find_job(spec.job))
        return str(created["id"])

    def status(self, backend_job_id: str) -> JobStatus:
        job = self._request("GET", f"/fine_tuning/jobs/{backend_job_id}")
        state = _STATES.get(str(job.get("status")), "running")
        error = None
        if state == "failed":
            err = job.get("error") or {}
            error = err.get("message") or "the provider reported the job failed"
            if err.get("code"):
                error = f"{err['code']}: {error}"
        return JobStatus(backend_job_id=backend_job_id, state=state, error=error,
                         detail=str(job.get("status")))

    def events(self, backend_job_id: str, limit: int = 100) -> list[dict[str, Any]]:
        page = self._request("GET", f"/fine_tuning/jobs/{backend_job_id}/events",
                             params={"limit": limit})
        # The API lists newest first; oldest first here (stable for events in the same second).
        oldest_first = list(page.get("data", []))[::-1]
        return sorted(oldest_first, key=lambda e: e.get("created_at", 0))

    def cancel(self, backend_job_id: str) -> None:
        self._request("POST", f"/fine_tuning/jobs/{backend_job_id}/cancel")

    def result(self, backend_job_id: str, spec: JobSpec) -> JobResult:
        job = self._request("GET", f"/fine_tuning/jobs/{backend_job_id}")
        history = [e["data"] for e in self.events(backend_job_id)
                   if e.get("type") == "metrics" and isinstance(e.get("data"), dict)]
        metrics: dict[str, Any] = {"trained_tokens": job.get("trained_tokens")}
        if history:
            last = history[-1]
            metrics.update({k: v for k, v in last.items() if k in (
                "step", "train_loss", "valid_loss", "full_valid_loss", "train_mean_token_accuracy")})
        artifacts = {f"result_file_{i}": f for i, f in enumerate(job.get("result_files") or [])}
        artifacts["training_file"] = str(job.get("training_file"))
        if job.get("validation_file"):
            artifacts["validation_file"] = str(job["validation_file"])
        return JobResult(metrics=metrics, artifacts=artifacts,
                         fine_tuned_model=job.get("fine_tuned_model"), history=history)


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200]
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(body)[:200]
