"""Which model drafts: a fine-tune job read from its lineage record, or a bare model folder.

:func:`resolve_job` turns a job id (the ``job`` of the ``sftflow.finetune.succeeded`` event, or
the dataset's ``best`` ref) into a :class:`DraftModel`: where its weights are, whether it is
the dataset's ``best`` now, the Label Studio project its training data came from, and the
system prompt that data was built with (so drafts see the inputs the model was trained on).
:func:`build_generator` makes the generator the flow asked for.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from sftflow.core.errors import ConfigError, SftflowError
from sftflow.core.settings import Settings
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.drafts.generators import (
    DraftGenerator,
    OpenAIChatGenerator,
    TransformersGenerator,
)
from sftflow.tasks.finetune import lineage
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.versions.read import load_manifest

GeneratorKind = Literal["transformers", "openai"]


class DraftModel(BaseModel):
    model_version: str = Field(description="Written on every prediction: the job id.")
    location: str | None = Field(None, description="s3:// prefix or folder of the weights (or adapter).")
    base_model: str | None = Field(None, description="The base model under a LoRA adapter.")
    method: Literal["full", "lora"] = "full"
    served_name: str | None = Field(None, description="The provider's model name (openai backend).")
    dataset: str | None = None
    version: str | None = None
    best: bool | None = Field(None, description="Whether the dataset's best ref names this job.")
    project_id: int | None = Field(None, description="Label Studio project of the training data.")
    system_prompt: str | None = None


def resolve_job(s3: S3, models_prefix: str, datasets_prefix: str, job: str) -> DraftModel:
    """The succeeded job ``job`` as a drafting model; an SftflowError for any other status."""
    record = lineage.load_record(s3, models_prefix, job)
    if record.status != "succeeded":
        raise SftflowError(f"model {job} is {record.status}, not succeeded: nothing to draft with")
    best, _ = lineage.read_model_ref(s3, models_prefix, record.dataset)
    manifest = load_manifest(s3, record.dataset, record.version, verify=False,
                             prefix=datasets_prefix)
    project_id = manifest.source.get("project_id")
    method = record.method if record.method in ("full", "lora") else "full"
    return DraftModel(
        model_version=job, location=record.artifacts.get("model"),
        base_model=record.base_model if method == "lora" else None, method=method,
        served_name=record.fine_tuned_model, dataset=record.dataset, version=record.version,
        best=best == job, project_id=int(project_id) if project_id is not None else None,
        system_prompt=manifest.config.get("system_prompt"),
    )


def best_job(s3: S3, models_prefix: str, dataset: str) -> str:
    """The job the dataset's ``best`` ref names; an SftflowError when there is none yet."""
    job, _ = lineage.read_model_ref(s3, models_prefix, dataset)
    if not job:
        raise SftflowError(f"dataset {dataset!r} has no best model yet: nothing to draft with")
    return job


def build_generator(kind: GeneratorKind, model: DraftModel, settings: Settings, s3: S3, *,
                    workdir: Path | None = None, max_new_tokens: int | None = None) -> DraftGenerator:
    """The generator of ``kind`` for ``model`` (s3:// weights are downloaded under ``workdir``)."""
    drafts = settings.drafts
    tokens = max_new_tokens or drafts.max_new_tokens
    if kind == "openai":
        key = drafts.api_key.get_secret_value() if drafts.api_key else None
        return OpenAIChatGenerator(drafts.base_url, drafts.model or model.served_name, key,
                                   model_version=model.model_version, system_prompt=model.system_prompt,
                                   max_new_tokens=tokens)
    if not model.location:
        raise ConfigError(f"model {model.model_version} has no saved weights to load with transformers "
                          "(a hosted model: use the openai generator)")
    from sftflow.tasks.finetune.training import materialise_model

    cache = workdir or Path(tempfile.mkdtemp(prefix="sftflow-drafts-"))
    weights = materialise_model(s3, model.location, cache)
    base = materialise_model(s3, model.base_model, cache) if model.base_model else None
    return TransformersGenerator(weights, model_version=model.model_version, base_dir=base,
                                 system_prompt=model.system_prompt, max_new_tokens=tokens)


def resolve_model(s3: S3, models_prefix: str, datasets_prefix: str, *, job: str | None = None,
                  dataset: str | None = None, location: str | None = None,
                  model_version: str | None = None) -> DraftModel:
    """The drafting model named by exactly one of: a ``job``, a ``dataset`` (its ``best``), or
    a model ``location`` with the ``model_version`` its predictions carry."""
    if sum(x is not None for x in (job, dataset, location)) != 1:
        raise ConfigError("name the drafting model by exactly one of: job, dataset (its best "
                          "model), model location")
    if location is not None:
        if not model_version:
            raise ConfigError("a model location needs the model_version its drafts are written with")
        return DraftModel(model_version=model_version, location=location)
    return resolve_job(s3, models_prefix, datasets_prefix,
                       job or best_job(s3, models_prefix, dataset or ""))


resolve_model_task = io_task(name="resolve-draft-model")(resolve_model)
