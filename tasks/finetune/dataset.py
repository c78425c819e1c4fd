"""The dataset version a fine-tune job trains on: the one place this package reads a dataset
manifest (``tasks.versions``), and the trained-version tag it writes back.

:func:`read_version` resolves ``NAME[@VERSION_OR_TAG]``, verifies every file's sha256, and
returns a :class:`TrainingData`: the figures the gates check, the s3:// URIs of each split and
format, and the sha256 of ``manifest.json`` itself (the version's identity in job names and
lineage). Everything else in ``tasks/finetune`` and ``flows/finetune.py`` uses that record, so
a change of the manifest's shape is a change to this function only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from sftflow.core.hashing import sha256_hex
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.finetune.backends import Hyperparameters, JobSpec
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.versions.keys import DatasetKeys
from sftflow.tasks.versions.manifest import FileEntry, parse_ref
from sftflow.tasks.versions.read import load_manifest, version_bytes
from sftflow.tasks.versions.refs import resolve, set_tag


class DataFile(BaseModel):
    split: str | None
    format: str = Field(description="parquet | openai_chat | ... (the manifest's file format).")
    uri: str = Field(description="s3:// URI of the file.")


class TrainingData(BaseModel):
    """What a fine-tune job takes from one verified dataset version."""

    dataset: str
    version: str
    manifest_uri: str
    manifest_sha256: str = Field(description="sha256 of the manifest.json bytes.")
    rows: dict[str, int] = Field(description="split -> rows")
    files: list[DataFile] = Field(description="In manifest order.")
    columns: list[str] | None = Field(description="Column names from the manifest's schema; None if unstated.")

    @property
    def where(self) -> str:
        return f"{self.dataset}@{self.version}"

    def uris(self, split: str, fmt: str = "parquet") -> list[str]:
        return [f.uri for f in self.files if f.split == split and f.format == fmt]

    def has(self, split: str, fmt: str) -> bool:
        return bool(self.uris(split, fmt))

    def job_spec(self, *, job: str, base_model: str, method: Literal["full", "lora"],
                 hyperparameters: Hyperparameters, output_uri: str) -> JobSpec:
        """What a backend needs to train ``job`` on this version."""
        return JobSpec(
            job=job, dataset=self.dataset, version=self.version, base_model=base_model,
            method=method, hyperparameters=hyperparameters,
            train_files=self.uris("train", "parquet"), eval_files=self.uris("eval", "parquet"),
            chat_train_files=self.uris("train", "openai_chat"),
            chat_eval_files=self.uris("eval", "openai_chat"), output_uri=output_uri,
        )


def read_version(s3: S3, datasets_prefix: str, ref: str) -> TrainingData:
    """The verified version ``NAME[@VERSION_OR_TAG]`` (``NAME`` alone: ``refs/latest``): its
    manifest validated (``versions.manifest.Manifest``) and every file's checksum checked."""
    name, ref_version = parse_ref(ref.strip())
    version = resolve(s3, name, ref_version, prefix=datasets_prefix)
    manifest = load_manifest(s3, name, version, verify=True, prefix=datasets_prefix)
    keys = DatasetKeys.of(datasets_prefix, name)
    key = keys.manifest(version)
    raw, _ = s3.get_bytes(key)

    def uri(f: FileEntry) -> str:
        """The file, or for a shard with deleted rows its trimmed copy (written once)."""
        if not manifest.deleted.get(manifest.shard_of(f)):
            return s3.uri(manifest.key(f.path))
        derived = keys.derived_file(version, f.path)
        if s3.head(derived) is None:
            s3.put_bytes(derived, version_bytes(s3, manifest, f))
        return s3.uri(derived)

    return TrainingData(
        dataset=name, version=version, manifest_uri=s3.uri(key), manifest_sha256=sha256_hex(raw),
        rows={split: int(n or 0) for split, n in manifest.rows.items()},
        files=[DataFile(split=f.split, format=f.format, uri=uri(f)) for f in manifest.files],
        columns=sorted(manifest.schema_) or None,
    )


def tag_trained(s3: S3, datasets_prefix: str, data: TrainingData, job: str) -> str:
    """Tag the version ``trained-<job>``; returns the tag."""
    tag = f"trained-{job}"
    set_tag(s3, data.dataset, tag, data.version, prefix=datasets_prefix)
    return tag


read_version_task = io_task(name="read-version")(read_version)
tag_trained_task = io_task(name="tag-trained-version")(tag_trained)
