"""The fine-tuning backend protocol and its registry.

A backend turns a :class:`JobSpec` into a running job somewhere else (a Prefect deployment on a
GPU work pool, the OpenAI API, ...) and answers four questions about it: ``submit``, ``status``,
``cancel`` and ``result``, plus ``preflight`` (checks that must pass before anything is
submitted). The ``finetune`` flow only talks to this protocol and to the tasks at the end of
this module; a new backend (SageMaker, a Kubernetes Job) is a new module plus one entry in the
flow's ``BACKENDS`` table (``flows/finetune.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from sftflow.core.errors import ConfigError
from sftflow.tasks.runtime.declare import io_task

if TYPE_CHECKING:
    from sftflow.tasks.adapters.clients import Clients

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class Hyperparameters(BaseModel):
    """Training knobs shared by the backends (each maps what it supports)."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training split.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: epochs decide).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    max_length: int = Field(1024, ge=8, description="Tokens per example, measured with the base "
                            "model's tokenizer (and chat template) before training; never truncated.")
    length_policy: Literal["drop", "fail"] = Field(
        "drop", description="Rows longer than max_length: drop them (counted in the metrics) or fail the run.")
    lora_r: int = Field(16, ge=1, description="LoRA rank (method=lora).")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (method=lora).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout (method=lora).")
    seed: int = Field(42, description="Random seed.")
    loss: Literal["completion", "assistant"] = Field(
        "completion", description="trl: what the loss covers. completion: the tokens after the prompt "
        "(masked by the prompt/completion split); assistant: also only the tokens the chat template "
        "marks with {% generation %} (TRL's assistant_only_loss).")
    packing: bool = Field(
        False, description="trl: pack rows into sequences of max_length tokens with TRL's best-fit "
        "decreasing strategy (packing_strategy=bfd, padding-free batches: each row attends only to "
        "itself). No row is cut: rows over max_length are dropped before. Eval rows are not packed.")
    gradient_checkpointing: bool = Field(
        False, description="trl: recompute activations in the backward pass (less memory, slower).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="trl: auto is bf16 on a CUDA device that supports it, else fp32; bf16 "
        "on CPU trains under torch's CPU autocast; bf16 on a CUDA device without it is refused.")

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The fields added after the first configs (``length_policy``, ``loss``, ``packing``,
        ``gradient_checkpointing``, ``precision``) are left out at their defaults: the job names
        (a hash of this dump) of configs written before they existed do not change."""
        data = handler(self)
        for key, default in _ADDED_DEFAULTS:
            if key in data and data[key] == default:
                del data[key]
        return data


#: Fields added to :class:`Hyperparameters` after job names were first hashed, with their
#: defaults: left out of its dump at these values.
_ADDED_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("length_policy", "drop"), ("loss", "completion"), ("packing", False),
    ("gradient_checkpointing", False), ("precision", "auto"))


class Baseline(BaseModel):
    """A previously trained model to evaluate on the same eval split (the eval gate)."""

    job: str
    model_uri: str = Field(description="s3:// prefix of the saved model or adapter.")
    base_model: str
    method: Literal["full", "lora"]


class FewShotSpec(BaseModel):
    """The few-shot baseline of the eval gate: the base model prompted with ``k`` train rows,
    chosen by ``seed`` (``tasks/finetune/few_shot.py``), scored on the eval split's completions."""

    k: int = Field(3, ge=1, description="Train rows shown in the prompt.")
    seed: int = Field(0, description="Chooses the rows (recorded).")
    cache_uri: str | None = Field(None, description="s3:// JSON of the result, shared by every job of "
                                  "the same base model, version, k and seed.")


class JobSpec(BaseModel):
    """Everything a backend needs to run one fine-tuning job."""

    job: str = Field(description="sftflow job name: the idempotency key of (version, config).")
    dataset: str = Field(description="Dataset name.")
    version: str = Field(description="Dataset version id.")
    base_model: str = Field(description="Hub id, s3:// prefix or local folder (trl); model name (openai).")
    method: Literal["full", "lora"] = Field("lora", description="Full fine-tune or LoRA adapter.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Training knobs.")
    train_files: list[str] = Field(description="s3:// URIs of the train split (parquet).")
    eval_files: list[str] = Field(description="s3:// URIs of the eval split (parquet).")
    chat_train_files: list[str] = Field(default_factory=list, description="openai_chat JSONL.")
    chat_eval_files: list[str] = Field(default_factory=list, description="openai_chat JSONL.")
    output_uri: str = Field(description="s3:// prefix where the job writes its model and result.")
    baseline: Baseline | None = Field(None, description="Also evaluate this model (the eval gate).")
    few_shot: FewShotSpec | None = Field(None, description="Also evaluate the base model with k train "
                                         "rows in its prompt (the eval gate).")


class JobStatus(BaseModel):
    backend_job_id: str
    state: JobState
    error: str | None = None
    detail: str | None = Field(None, description="The backend's own status word.")

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


class JobResult(BaseModel):
    metrics: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict, description="name -> location")
    fine_tuned_model: str | None = None
    history: list[dict[str, Any]] = Field(default_factory=list, description="loss per step")
    training_record: dict[str, Any] | None = Field(
        None, description="What decided the token stream and its fingerprint (trl: tokens.TokenRecord).")
    few_shot: dict[str, Any] | None = Field(
        None, description="The few-shot baseline (trl: few_shot.FewShotResult).")


@runtime_checkable
class Backend(Protocol):
    name: str
    #: The longest pause between two status polls (the backoff's cap) unless the flow sets one:
    #: a remote provider's rate limits call for a long one, a job on our own work pool (its state
    #: read from our Prefect API) for a short one.
    poll_max_s: float

    def preflight(self, spec: JobSpec) -> dict[str, Any]:
        """Raise SftflowError if the job cannot work (missing base model, bad files)."""

    def submit(self, spec: JobSpec) -> str:
        """Start the job; the same ``spec.job`` submitted twice must not start two jobs."""

    def status(self, backend_job_id: str) -> JobStatus: ...

    def cancel(self, backend_job_id: str) -> None: ...

    def result(self, backend_job_id: str, spec: JobSpec) -> JobResult:
        """Metrics and artifact locations of a succeeded job."""


BackendFactory = Callable[["Clients"], Backend]


def get_backend(name: str, clients: Clients, factories: Mapping[str, BackendFactory]) -> Backend:
    """The backend ``name`` built by its factory; ConfigError naming the known ones otherwise."""
    try:
        factory = factories[name]
    except KeyError:
        raise ConfigError(f"unknown fine-tuning backend {name!r} (known: {', '.join(sorted(factories))})") from None
    return factory(clients)


# The backend's protocol methods as Prefect tasks: the finetune flow calls these.


def preflight(backend: Backend, spec: JobSpec) -> dict[str, Any]:
    return backend.preflight(spec)


def submit_job(backend: Backend, spec: JobSpec) -> str:
    return backend.submit(spec)


def job_status(backend: Backend, backend_job_id: str) -> JobStatus:
    return backend.status(backend_job_id)


def job_result(backend: Backend, backend_job_id: str, spec: JobSpec) -> JobResult:
    return backend.result(backend_job_id, spec)


def cancel_job(backend: Backend, backend_job_id: str) -> None:
    backend.cancel(backend_job_id)


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
preflight_task = io_task(name="backend-preflight")(preflight)
submit_job_task = io_task(name="submit-job", retries=2)(submit_job)
job_status_task = io_task(name="job-status")(job_status)
job_result_task = io_task(name="job-result")(job_result)
cancel_job_task = io_task(name="cancel-job")(cancel_job)
