"""The manifest: what a dataset version is, its id, and how a manifest is read back.

``Manifest`` and its ``FileEntry`` list (pydantic) are the manifest's one shape, for the writer
(``commit.commit_version``) and every reader. A manifest read from storage is validated: a file
path that is absolute or climbs out of the dataset root, an unknown split, deleted rows naming
no rows of a listed shard, or a manifest describing another version is refused, and file keys
are built from the root the reader computed, never from the root written in the file.

The version id is a hash of the sorted row hashes (each row hash covers the split) and of
the build configuration: unchanged annotations rebuild to the same id, and nothing is written.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
)

from sftflow.core.errors import SftflowError
from sftflow.core.hashing import sha256_hex
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.versions.keys import DatasetKeys, check_name

SPLITS = ("train", "eval")


def version_id(row_hashes: Iterable[str], cfg_hash: str) -> str:
    """16 hex chars of sha256 over the config hash and the sorted row hashes."""
    return sha256_hex("".join([f"{cfg_hash}\n", *(f"{h}\n" for h in sorted(row_hashes))]))[:16]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``NAME[@VERSION_OR_TAG]`` -> ``(name, version_or_tag | None)``."""
    name, _, version = ref.partition("@")
    return check_name("dataset", name), (version or None)


class FileEntry(BaseModel):
    """One file of a version, relative to the dataset root. ``of``: for a JSONL copy, the
    sha256 of the Parquet shard it was written from (absent from the JSON otherwise)."""

    model_config = ConfigDict(frozen=True)

    path: str
    split: Literal["train", "eval"] | None
    format: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    rows: int = Field(ge=0)
    of: str | None = None

    @field_validator("path")
    @classmethod
    def _inside_the_root(cls, path: str) -> str:
        parts = path.split("/")
        if (path.startswith("/") or "\\" in path or "\x00" in path
                or any(p in ("", ".", "..") for p in parts) or posixpath.isabs(path)):
            raise ValueError(f"file path {path!r} leaves the dataset root")
        return path

    @model_serializer(mode="wrap")
    def _without_empty_of(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if self.of is None:
            data.pop("of", None)
        return data


class Manifest(BaseModel):
    """``versions/<version>/manifest.json``: what a version is. Written once by
    ``commit_version``; read back only through ``load_manifest`` (or ``Manifest.parse``),
    which locates its files under the root the reader computed, never under ``root`` as
    written in the file."""

    model_config = ConfigDict(populate_by_name=True)

    dataset: str
    version: str
    parent: str | None = None
    root: str  # as written by the committer; informative only
    created_at: str
    files: list[FileEntry]
    rows: dict[str, int]
    schema_: dict[str, str] = Field(default_factory=dict, alias="schema")
    source: dict[str, Any] = Field(default_factory=dict)
    stats: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    config_hash: str = ""
    code_version: str = ""
    run_id: str | None = None
    #: Rows dropped from reused shards: Parquet file path -> row positions (0-based). The
    #: shard's JSONL copies and signature sidecar hold the same rows in the same order.
    deleted: dict[str, list[int]] = Field(default_factory=dict)
    _base: str = PrivateAttr("")  # the dataset root this manifest was read from

    @classmethod
    def parse(cls, data: bytes, *, root: str, where: str) -> Manifest:
        """Validate manifest bytes read at ``where`` (a URI, for messages); files are then
        located under ``root``. Anything malformed is an SftflowError naming ``where``."""
        try:
            raw = json.loads(data)
        except ValueError as err:
            raise SftflowError(f"manifest {where} is not valid JSON: {err}") from err
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise SftflowError(f"manifest {where} is refused: {loc}: {first['msg']}") from None
        sizes = {f.path: f.rows for f in manifest.files_of("parquet")}
        for path, positions in manifest.deleted.items():
            if path not in sizes or any(not 0 <= i < sizes[path] for i in positions):
                raise SftflowError(f"manifest {where} is refused: deleted rows of {path!r} "
                                   "name no rows of a listed Parquet file")
        return manifest.located(root)

    @model_serializer(mode="wrap")
    def _without_empty_deleted(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if not self.deleted:
            data.pop("deleted", None)  # manifests without deletions keep their old bytes
        return data

    def located(self, root: str) -> Manifest:
        self._base = root
        return self

    def key(self, path: str) -> str:
        """The object key of a file path of this manifest."""
        if not self._base:
            raise SftflowError(f"manifest of {self.dataset}@{self.version} was not located")
        return DatasetKeys(self._base).key(path)

    def files_of(self, fmt: str, split: str | None = None) -> list[FileEntry]:
        """Files of one format (and split, unless None), in manifest order."""
        return [f for f in self.files if f.format == fmt and (split is None or f.split == split)]

    def shard_of(self, f: FileEntry) -> str:
        """The Parquet path whose rows ``f`` holds (itself, or the shard it was written from)."""
        if f.of is None:
            return f.path
        return next((p.path for p in self.files_of("parquet") if p.sha256 == f.of), f.path)

    def to_json(self) -> bytes:
        """The manifest's bytes as committed (key order and layout fixed)."""
        return json.dumps(self.model_dump(by_alias=True), indent=1, ensure_ascii=False,
                          default=str).encode()


def file_key(manifest: Manifest, path: str) -> str:
    """The object key of one of ``manifest``'s file paths (under the root it was read from)."""
    return manifest.key(path)


def manifest_at(s3: S3, key: str, root: str) -> Manifest:
    """The manifest stored at ``key``, validated, its files located under ``root``
    (KeyError when there is none)."""
    return Manifest.parse(s3.get_bytes(key)[0], root=root, where=s3.uri(key))


def read_manifest(s3: S3, root: str, dataset: str, version: str) -> Manifest:
    """The manifest of version id ``version`` of ``dataset`` (whose root is ``root``); refused
    unless it describes that very version."""
    key = DatasetKeys(root).manifest(version)
    try:
        data, _ = s3.get_bytes(key)
    except KeyError:
        raise SftflowError(f"dataset {dataset!r} has no version {version!r} ({s3.uri(key)})") from None
    manifest = Manifest.parse(data, root=root, where=s3.uri(key))
    if (manifest.dataset, manifest.version) != (dataset, version):
        raise SftflowError(
            f"manifest {s3.uri(key)} is refused: it describes "
            f"{manifest.dataset}@{manifest.version}, not {dataset}@{version}"
        )
    return manifest
