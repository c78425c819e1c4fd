"""``sftflow models reproduce JOB``: is a trl job's token stream reproducible from its record?

The job's lineage record names the dataset version (and its manifest's sha256) and, in its
``training_record`` (``tokens.TokenRecord``), the tokenizer, the loss, the seed and the batch
size. This reads the version's openai_chat files from the bucket, loads the tokenizer the
record names (the job's base model: hub cache, folder or s3:// prefix), prepares the rows as
the training did (``training.prepare_examples``: format, length check) and tokenizes them
(``training.token_stream``), then compares: the hashes of the first batches, in order (the
first that differs is named), the hash of every train row, the mask coverage. The tokenizer,
chat template and library versions are compared too and each difference is listed, but the
verdict is the stream's: a newer library that tokenizes identically still reproduces.

A packed job (``packing``) is confirmed the same way: its rows are packed again by trl's own
packer (``tokens.pack_rows``) and its batches are those of the packed sequences; the train rows
and the coverage are compared before packing. A record without ``packing`` was not packed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from sftflow.core.errors import SftflowError
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.finetune.backends import Hyperparameters
from sftflow.tasks.finetune.dataset import read_version
from sftflow.tasks.finetune.lineage import load_record
from sftflow.tasks.finetune.tokens import TokenRecord, first_difference


class Reproduction(BaseModel):
    """The verdict of :func:`reproduce` (``--json`` prints it)."""

    job: str
    dataset: str
    version: str
    identical: bool = Field(description="The first batches, every train row and the mask coverage are the same.")
    first_differing_batch: int | None = Field(None, description="0-based; None when the batches match.")
    batches_compared: int
    rows_identical: bool
    differences: list[str] = Field(default_factory=list, description="Everything that differs, in words.")
    recorded: TokenRecord
    recomputed: TokenRecord


def _differences(rec: TokenRecord, now: TokenRecord, batch: int | None) -> list[str]:
    out = []
    if batch is not None:
        out.append(f"batch {batch} differs (of the first {len(rec.batches)}): "
                   f"recorded {rec.batches[batch][:12] if batch < len(rec.batches) else 'none'}…, "
                   f"now {now.batches[batch][:12] if batch < len(now.batches) else 'none'}…")
    if rec.rows_sha256 != now.rows_sha256:
        out.append("the train rows' tokens or labels differ")
    for key in ("tokenizer_sha256", "chat_template_sha256", "format", "loss", "packing", "packed_rows"):
        if getattr(rec, key) != getattr(now, key):
            out.append(f"{key}: recorded {getattr(rec, key)}, now {getattr(now, key)}")
    if rec.coverage != now.coverage:
        changed = {k: (v, getattr(now.coverage, k)) for k, v in rec.coverage if getattr(now.coverage, k) != v}
        out.append("mask coverage: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    for lib in sorted(set(rec.versions) | set(now.versions)):
        if rec.versions.get(lib) != now.versions.get(lib):
            out.append(f"{lib} {rec.versions.get(lib)} -> {now.versions.get(lib)} (library version)")
    return out


def compare(job: str, dataset: str, version: str, rec: TokenRecord, now: TokenRecord) -> Reproduction:
    """The verdict on two records of one job's stream (pure)."""
    batch = first_difference(rec.batches, now.batches)
    rows_identical = rec.rows_sha256 == now.rows_sha256
    return Reproduction(
        job=job, dataset=dataset, version=version,
        identical=batch is None and rows_identical and rec.coverage == now.coverage,
        first_differing_batch=batch, batches_compared=max(len(rec.batches), len(now.batches)),
        rows_identical=rows_identical, differences=_differences(rec, now, batch), recorded=rec, recomputed=now,
    )


def reproduce(s3: S3, models_prefix: str, datasets_prefix: str, job: str, workdir: Path) -> Reproduction:
    """Re-tokenise ``job``'s training rows from its dataset version and its record; compare."""
    from sftflow.tasks.finetune.training import (
        load_chat_splits,
        load_tokenizer,
        materialise_model,
        prepare_examples,
        token_stream,
    )

    record = load_record(s3, models_prefix, job)
    if record.training_record is None:
        raise SftflowError(f"job {job} has no training record (not a trl job, or trained before the token "
                           "stream was recorded): nothing to reproduce against")
    rec = record.training_record
    data = read_version(s3, datasets_prefix, f"{record.dataset}@{record.version}")
    if record.dataset_manifest_sha256 and data.manifest_sha256 != record.dataset_manifest_sha256:
        raise SftflowError(f"{record.dataset}@{record.version}: its manifest's sha256 is {data.manifest_sha256}, "
                           f"the job trained on {record.dataset_manifest_sha256}")
    hp = Hyperparameters.model_validate(record.hyperparameters)
    spec = data.job_spec(job=job, base_model=rec.tokenizer, method=record.method or "lora",
                         hyperparameters=hp, output_uri=str(record.artifacts.get("model", "")))
    messages = load_chat_splits(spec.chat_train_files, spec.chat_eval_files, s3.fsspec_options(),
                                workdir / "hf-datasets")
    tokenizer = load_tokenizer(materialise_model(s3, rec.tokenizer, workdir / "models"))
    fmt, examples, check = prepare_examples(messages, tokenizer, hp)
    _, now = token_stream(tokenizer, fmt, messages, examples, check, spec, refuse=False)
    return compare(job, record.dataset, record.version, rec, now)


def summary(result: Reproduction) -> list[str]:
    """The verdict in lines, for the CLI."""
    head = "identical" if result.identical else "differs"
    lines = [f"{result.job} ({result.dataset}@{result.version}): token stream {head}"]
    if result.first_differing_batch is not None:
        lines.append(f"  first differing batch: {result.first_differing_batch}")
    cov: dict[str, Any] = result.recomputed.coverage.model_dump()
    lines.append(f"  batches compared: {result.batches_compared}; rows identical: {result.rows_identical}; "
                 f"trained tokens per row min {cov['trained_tokens_min']}, median {cov['trained_tokens_median']}")
    lines += [f"  - {d}" for d in result.differences]
    return lines
