"""The manifest model (tasks.versioning.Manifest / FileEntry) and the refs CAS, on an in-memory
S3: what a reader refuses, what a writer writes. No services."""

from __future__ import annotations

import hashlib
import json

import pytest

from sftflow.core.errors import SftflowError
from sftflow.tasks import versioning
from sftflow.tasks.storage import PreconditionFailed
from sftflow.tasks.versioning import FileEntry, Manifest

ROOT = "datasets/d"
SHA = "ab" * 32


class MemS3:
    """The subset of ``tasks.storage.S3`` that versioning's readers and the CAS use."""

    bucket = "mem"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.fail_puts: int = 0  # conditional writes to refuse, as if another writer won

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        if key not in self.objects:
            raise KeyError(key)
        return self.objects[key], hashlib.md5(self.objects[key]).hexdigest()

    def head(self, key: str):
        return object() if key in self.objects else None

    def put_bytes(self, key, data, *, if_none_match=False, if_match=None, content_type=None):
        if self.fail_puts:
            self.fail_puts -= 1
            raise PreconditionFailed(self.bucket, key)
        if if_none_match and key in self.objects:
            raise PreconditionFailed(self.bucket, key)
        if if_match is not None and self.get_bytes(key)[1] != if_match:
            raise PreconditionFailed(self.bucket, key)
        self.objects[key] = data

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def _manifest(**changes) -> dict:
    data = b"rows"
    m = {
        "dataset": "d", "version": "0123456789abcdef", "parent": None, "root": ROOT,
        "created_at": "2026-01-01T00:00:00+00:00",
        "files": [
            {"path": "shards/x.parquet", "split": "train", "format": "parquet",
             "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "rows": 1},
            {"path": "shards/trl/y.jsonl", "split": "train", "format": "trl", "sha256": SHA,
             "size": 3, "rows": 1, "of": SHA},
            {"path": "versions/0123456789abcdef/README.md", "split": None, "format": "card",
             "sha256": SHA, "size": 3, "rows": 0},
        ],
        "rows": {"train": 1, "eval": 0}, "schema": {"prompt": "string"},
        "source": {"project_id": 7, "snapshot_at": "2026-01-01"}, "stats": {}, "config": {},
        "config_hash": "cafecafecafecafe", "code_version": "sftflow 0", "run_id": None,
    }
    m.update(changes)
    return m


def _store(s3: MemS3, manifest: dict) -> None:
    s3.objects[f"{ROOT}/versions/{manifest['version']}/manifest.json"] = json.dumps(
        manifest).encode()
    s3.objects[f"{ROOT}/refs/latest"] = manifest["version"].encode()


def test_the_json_written_keeps_its_keys_and_shape():
    raw = _manifest()
    m = Manifest.parse(json.dumps(raw).encode(), root=ROOT, where="here")
    again = json.loads(m.to_json())
    assert again == raw and list(again) == list(raw)
    assert "of" not in again["files"][0] and again["files"][1]["of"] == SHA
    assert m.schema_ == {"prompt": "string"} and m.files[2].split is None


@pytest.mark.parametrize("path", [
    "/etc/passwd", "../other/shards/x.parquet", "shards/../../x", "shards//x", "./x", "",
    "shards\\..\\x",
])
def test_a_file_path_leaving_the_root_is_refused_naming_the_manifest(path):
    s3 = MemS3()
    bad = _manifest()
    bad["files"][0]["path"] = path
    _store(s3, bad)
    with pytest.raises(SftflowError, match=r"manifest s3://mem/datasets/d/versions/0123456789abcdef"
                                           r"/manifest.json is refused: files\.0\.path"):
        versioning.load_manifest(s3, "d", verify=False)


def test_an_unknown_split_is_refused():
    s3 = MemS3()
    bad = _manifest()
    bad["files"][0]["split"] = "test"
    _store(s3, bad)
    with pytest.raises(SftflowError, match=r"is refused: files\.0\.split"):
        versioning.load_manifest(s3, "d", verify=False)


def test_a_manifest_of_another_version_or_dataset_is_refused():
    s3 = MemS3()
    raw = _manifest(dataset="other")
    _store(s3, raw)
    with pytest.raises(SftflowError, match="describes other@0123456789abcdef, not d@"):
        versioning.load_manifest(s3, "d", verify=False)


def test_keys_come_from_the_readers_root_not_the_manifests():
    s3 = MemS3()
    _store(s3, _manifest(root="elsewhere/../../secrets"))
    s3.objects[f"{ROOT}/shards/x.parquet"] = b"rows"
    m = versioning.load_manifest(s3, "d", verify=False)
    assert versioning.file_key(m, m.files[0].path) == f"{ROOT}/shards/x.parquet"
    assert versioning.data_files(s3, m, "train") == [f"s3://mem/{ROOT}/shards/x.parquet"]
    versioning.verify_files(s3, m, m.files_of("parquet"))  # read from the reader's root


def test_not_json_and_missing_fields_are_clear_errors():
    with pytest.raises(SftflowError, match="manifest there is not valid JSON"):
        Manifest.parse(b"{", root=ROOT, where="there")
    raw = _manifest()
    del raw["files"]
    with pytest.raises(SftflowError, match="manifest there is refused: files"):
        Manifest.parse(json.dumps(raw).encode(), root=ROOT, where="there")
    with pytest.raises(SftflowError, match="not located"):
        Manifest.model_validate(_manifest()).key("shards/x.parquet")


def test_file_entry_omits_of_only_when_absent():
    e = FileEntry(path="shards/a.parquet", split="eval", format="parquet", sha256=SHA, size=1,
                  rows=1)
    assert e.model_dump() == {"path": "shards/a.parquet", "split": "eval", "format": "parquet",
                              "sha256": SHA, "size": 1, "rows": 1}


def test_baseline_is_the_latest_versions_source_counters():
    s3 = MemS3()
    assert versioning.load_baseline(s3, "d") == (None, None)
    assert versioning.load_baseline(s3, None) == (None, None)
    _store(s3, _manifest())
    assert versioning.load_baseline(s3, "d") == (
        "0123456789abcdef", {"project_id": 7, "snapshot_at": "2026-01-01"})


def test_cas_retries_after_a_lost_race_and_reports_it():
    s3 = MemS3()
    steps = []
    s3.fail_puts = 2
    moved, latest, retries, sup = versioning.advance_latest(
        s3, ROOT, "v1", "2026-01-01", hook=steps.append)
    assert (moved, latest, retries, sup) == (True, "v1", 2, None)
    assert steps == ["cas-retry", "cas-retry"] and s3.objects[f"{ROOT}/refs/latest"] == b"v1"
    s3.fail_puts = 10
    with pytest.raises(SftflowError, match="after 3 attempts"):
        versioning.advance_latest(s3, ROOT, "v2", None, max_attempts=3)


def test_cas_leaves_latest_on_a_version_from_a_newer_snapshot():
    s3 = MemS3()
    _store(s3, _manifest(source={"snapshot_at": "2026-05-01"}))
    got = versioning.advance_latest(s3, ROOT, "v-old", "2026-04-01")
    assert got == (False, "0123456789abcdef", 0, "0123456789abcdef")


def test_version_ids_are_pinned():
    assert versioning.config_hash({"eval_fraction": 0.1}) == hashlib.sha256(
        b'{"eval_fraction":0.1}').hexdigest()[:16]
    expected = hashlib.sha256(b"cfg\na\nb\n").hexdigest()[:16]
    assert versioning.version_id(["b", "a"], "cfg") == expected
