"""The key layout of a dataset in object storage: the one place a key, or a file path under a
dataset root, is spelled. Every other module of ``tasks.versions`` (and every reader outside
it) builds keys through this one.

Layout under ``s3://<bucket>/<prefix>/<dataset>/`` (the *dataset root*)::

    shards/<sha256>.parquet                 rows, content-addressed, shared between versions
    shards/openai/<sha256>.jsonl            the same rows as OpenAI chat JSONL
    shards/trl/<sha256>.jsonl               the same rows as TRL prompt/completion JSONL
    shards/minhash/<sha256>.npy             the shard's MinHash signatures, in row order
    index/<sha256>.parquet                  a chunk of the task index (content-addressed)
    index/<sha256>.jsonl                    a chunk of the exclusions (content-addressed)
    versions/<version>/README.md            dataset card (HF YAML front matter)
    versions/<version>/exclusions.jsonl     every dropped row with its reason
    versions/<version>/manifest.json        the version: files + sha256 + sizes + rows, ...
    derived/<version>/<path>                a shard trimmed of the version's deleted rows,
                                            for readers that need whole files (kept by ``gc``
                                            while the version exists)
    refs/latest                             text: a version id (moved with If-Match CAS)
    refs/tags/<tag>                         text: a version id
    refs/announced/<version>                empty: the version's ``dataset.versioned`` event
                                            was emitted (written after the emission)

File paths in a manifest are relative to the dataset root (``shard_path`` and its siblings);
``DatasetKeys`` turns them, and every ref and manifest, into object keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sftflow.core.errors import SftflowError
from sftflow.core.settings import DatasetSettings

DEFAULT_PREFIX: str = DatasetSettings.model_fields["prefix"].default
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MANIFEST = "manifest.json"


def is_name(name: str | None) -> bool:
    """Whether ``name`` may name a dataset, a version or a tag."""
    return _NAME.match(name or "") is not None


def check_name(kind: str, name: str) -> str:
    if not is_name(name):
        raise SftflowError(
            f"invalid {kind} name {name!r}: use letters, digits, '.', '_' or '-' (max 128)"
        )
    return name


def dataset_root(settings_or_prefix: Any, dataset: str) -> str:
    """Key prefix of a dataset (no trailing slash): ``<prefix>/<dataset>``."""
    prefix = settings_or_prefix
    if hasattr(prefix, "datasets"):  # the Settings object
        prefix = prefix.datasets.prefix
    elif hasattr(prefix, "prefix"):  # DatasetSettings
        prefix = prefix.prefix
    prefix = str(prefix or "").strip("/")
    check_name("dataset", dataset)
    return f"{prefix}/{dataset}" if prefix else dataset


def datasets_listing(prefix: str) -> str:
    """The key prefix under which every dataset root is one folder (``""`` or ``<prefix>/``)."""
    return (prefix.strip("/") + "/") if prefix.strip("/") else ""


# -- file paths, relative to the dataset root ----------------------------------------------------
def shard_path(sha256: str) -> str:
    """A Parquet shard."""
    return f"shards/{sha256}.parquet"


def copy_path(folder: str, sha256: str) -> str:
    """A JSONL copy of a shard (``folder``: ``openai`` or ``trl``)."""
    return f"shards/{folder}/{sha256}.jsonl"


def sidecar_path(sha256: str) -> str:
    """A shard's MinHash signature sidecar."""
    return f"shards/minhash/{sha256}.npy"


def index_path(sha256: str, extension: str) -> str:
    """A chunk of the task index (``parquet``) or of the exclusions (``jsonl``)."""
    return f"index/{sha256}.{extension}"


def version_path(version: str, name: str) -> str:
    """A file of one version only (``README.md``, ``exclusions.jsonl``, ``manifest.json``)."""
    return f"versions/{version}/{name}"


# -- object keys ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetKeys:
    """Every object key of one dataset, from its root (``dataset_root``)."""

    root: str

    @classmethod
    def of(cls, prefix: Any, dataset: str) -> DatasetKeys:
        """The keys of ``dataset`` under ``prefix`` (the name checked)."""
        return cls(dataset_root(prefix, dataset))

    def key(self, path: str) -> str:
        """The object key of a file path relative to the root."""
        return f"{self.root}/{path}"

    @property
    def everything(self) -> str:
        """The listing prefix of every object of the dataset."""
        return f"{self.root}/"

    @property
    def versions(self) -> str:
        """The listing prefix of the versions' own files (manifests among them)."""
        return f"{self.root}/versions/"

    def manifest(self, version: str) -> str:
        return self.key(version_path(version, MANIFEST))

    def is_manifest(self, key: str) -> bool:
        """Whether ``key`` (listed under the root) is a version's manifest."""
        return key.endswith(f"/{MANIFEST}") and key.startswith(self.versions)

    @staticmethod
    def version_of_manifest(key: str) -> str:
        """The version whose manifest is at ``key``."""
        return key.split("/")[-2]

    @property
    def refs(self) -> str:
        """The listing prefix of every ref (never collected)."""
        return f"{self.root}/refs/"

    @property
    def latest(self) -> str:
        return f"{self.root}/refs/latest"

    @property
    def tags(self) -> str:
        """The listing prefix of the tags."""
        return f"{self.root}/refs/tags/"

    def tag(self, tag: str) -> str:
        return f"{self.tags}{check_name('tag', tag)}"

    @staticmethod
    def tag_of(key: str) -> str:
        """The tag a key listed under ``tags`` names."""
        return key.rsplit("/", 1)[-1]

    def announced(self, version: str) -> str:
        """The marker written once ``version``'s ``dataset.versioned`` event was emitted."""
        return f"{self.root}/refs/announced/{check_name('version', version)}"

    @property
    def derived(self) -> str:
        """The listing prefix of the trimmed copies (``derived/<version>/<path>``)."""
        return f"{self.root}/derived/"

    def derived_file(self, version: str, path: str) -> str:
        """Where a reader that needs whole files (a training job) keeps the trimmed copy of a
        shard with deleted rows: under the version, kept by ``gc`` while the version exists."""
        return f"{self.derived}{check_name('version', version)}/{path}"

    def derived_version(self, key: str) -> str:
        """The version a key under ``derived`` belongs to."""
        return key[len(self.derived):].split("/", 1)[0]
