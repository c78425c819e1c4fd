"""The manifest model (tasks.versions.manifest: Manifest / FileEntry) and the refs CAS: what a reader
refuses and what a writer writes (pure where no storage is involved; the real SeaweedFS
elsewhere, with the fault proxy standing in for a concurrent writer that wins the CAS)."""

from __future__ import annotations

import hashlib
import json

import pytest

from sftflow.core.errors import SftflowError
from sftflow.core.hashing import config_hash
from sftflow.tasks.versions.manifest import FileEntry, Manifest, file_key, version_id
from sftflow.tasks.versions.read import data_files, load_baseline, load_manifest, verify_files
from sftflow.tasks.versions.refs import advance_latest

ROOT = "datasets/d"
SHA = "ab" * 32


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


def _store(s3, manifest: dict) -> None:
    s3.put_bytes(f"{ROOT}/versions/{manifest['version']}/manifest.json",
                 json.dumps(manifest).encode())
    s3.put_bytes(f"{ROOT}/refs/latest", manifest["version"].encode())


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
@pytest.mark.integration
def test_a_file_path_leaving_the_root_is_refused_naming_the_manifest(path, s3):
    bad = _manifest()
    bad["files"][0]["path"] = path
    _store(s3, bad)
    with pytest.raises(SftflowError, match=rf"manifest s3://{s3.bucket}/datasets/d/versions/0123456789abcdef"
                                           r"/manifest.json is refused: files\.0\.path"):
        load_manifest(s3, "d", verify=False)


@pytest.mark.integration
def test_an_unknown_split_is_refused(s3):
    bad = _manifest()
    bad["files"][0]["split"] = "test"
    _store(s3, bad)
    with pytest.raises(SftflowError, match=r"is refused: files\.0\.split"):
        load_manifest(s3, "d", verify=False)


@pytest.mark.integration
def test_a_manifest_of_another_version_or_dataset_is_refused(s3):
    raw = _manifest(dataset="other")
    _store(s3, raw)
    with pytest.raises(SftflowError, match="describes other@0123456789abcdef, not d@"):
        load_manifest(s3, "d", verify=False)


@pytest.mark.integration
def test_keys_come_from_the_readers_root_not_the_manifests(s3):
    _store(s3, _manifest(root="elsewhere/../../secrets"))
    s3.put_bytes(f"{ROOT}/shards/x.parquet", b"rows")
    m = load_manifest(s3, "d", verify=False)
    assert file_key(m, m.files[0].path) == f"{ROOT}/shards/x.parquet"
    assert data_files(s3, m, "train") == [f"s3://{s3.bucket}/{ROOT}/shards/x.parquet"]
    verify_files(s3, m, m.files_of("parquet"))  # read from the reader's root


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


@pytest.mark.integration
def test_baseline_is_the_latest_versions_source_counters(s3):
    assert load_baseline(s3, "d") == (None, None)
    assert load_baseline(s3, None) == (None, None)
    _store(s3, _manifest())
    assert load_baseline(s3, "d") == (
        "0123456789abcdef", {"project_id": 7, "snapshot_at": "2026-01-01"})


@pytest.mark.integration
def test_cas_retries_after_a_lost_race_and_reports_it(settings, s3):
    """The proxy answers 412 to the first refs/latest writes, as S3 does when another writer
    moved the ref in between: the CAS re-reads and retries, and gives up after its attempts."""
    from urllib.parse import urlparse

    from sftflow.tasks.adapters.s3 import build_s3
    from tests.faults.proxy import Fault, FaultProxy

    up = urlparse(settings.s3.endpoint_url)
    with FaultProxy(up.hostname, up.port) as proxy:
        racing = build_s3(settings.s3.model_copy(update={"endpoint_url": proxy.url,
                                                         "bucket": s3.bucket}))
        racing.check_conditional_writes()  # the probe passes before any fault is set
        proxy.add(Fault("status", method="PUT", path="/refs/latest", status=412, times=2))
        steps = []
        moved, latest, retries, sup = advance_latest(
            racing, ROOT, "v1", "2026-01-01", hook=steps.append)
        assert (moved, latest, retries, sup) == (True, "v1", 2, None)
        assert steps == ["cas-retry", "cas-retry"]
        assert s3.get_bytes(f"{ROOT}/refs/latest")[0] == b"v1"
        proxy.add(Fault("status", method="PUT", path="/refs/latest", status=412, times=0))
        with pytest.raises(SftflowError, match="after 3 attempts"):
            advance_latest(racing, ROOT, "v2", None, max_attempts=3)


@pytest.mark.integration
def test_cas_leaves_latest_on_a_version_from_a_newer_snapshot(s3):
    _store(s3, _manifest(source={"snapshot_at": "2026-05-01"}))
    got = advance_latest(s3, ROOT, "v-old", "2026-04-01")
    assert got == (False, "0123456789abcdef", 0, "0123456789abcdef")


def test_version_ids_are_pinned():
    assert config_hash({"eval_fraction": 0.1}) == hashlib.sha256(
        b'{"eval_fraction":0.1}').hexdigest()[:16]
    expected = hashlib.sha256(b"cfg\na\nb\n").hexdigest()[:16]
    assert version_id(["b", "a"], "cfg") == expected


def _pull_cli(s3, dest):
    from typer.testing import CliRunner

    from sftflow.cli import app

    return CliRunner().invoke(app, ["datasets", "pull", "d", str(dest), "--bucket", s3.bucket])


@pytest.mark.integration
def test_pull_refuses_a_crafted_manifest_and_writes_nothing(s3, tmp_path):
    """Issue #10 item 9: a manifest in the bucket names a file outside the root."""
    bad = _manifest()
    bad["files"][0]["path"] = "shards/../../../../escaped.parquet"
    _store(s3, bad)
    s3.put_bytes(f"{ROOT}/shards/x.parquet", b"rows")
    result = _pull_cli(s3, tmp_path / "dest")
    assert isinstance(result.exception, SftflowError)
    assert "is refused: files.0.path" in str(result.exception)
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.integration
def test_pull_refuses_a_destination_resolving_outside_dest(s3, tmp_path):
    """Defence in depth: whatever the manifest says, every file's destination must resolve
    inside ``dest`` (here ``dest/data`` is a symlink out of it)."""
    one = _manifest()
    one["files"] = one["files"][:1]  # shards/x.parquet, train: pulled to data/train/x.parquet
    _store(s3, one)
    s3.put_bytes(f"{ROOT}/shards/x.parquet", b"rows")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "data").symlink_to(outside, target_is_directory=True)
    result = _pull_cli(s3, dest)
    assert isinstance(result.exception, SftflowError)
    assert "resolves outside" in str(result.exception)
    assert list(outside.rglob("*")) == []
