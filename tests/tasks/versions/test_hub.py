"""tasks/versions/hub.py: the Hub layout and card (pure), and a pulled version that plain
``datasets.load_dataset(folder)`` loads (real SeaweedFS, `sftflow datasets pull`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sftflow.tasks.versions import formats, hub
from sftflow.tasks.versions.commit import CommitRequest, commit_version
from sftflow.tasks.versions.manifest import FileEntry, Manifest
from sftflow.tasks.versions.pull import pull_version
from tests.tasks._datasets import final_rows

SFTFLOW = str(Path(sys.executable).parent / "sftflow")
SHA = "a" * 64
STATS = {
    "export": {"tasks": 130, "annotations": 128, "excluded:missing_prompt": 2, "cancelled": 1},
    "filters": {"kept": 120, "dropped:too_long": 5, "dropped:secret": 3, "redacted:email": 4},
    "dedup": {"kept": 110, "dropped": {"exact_duplicate": 6, "near_duplicate": 4},
              "clusters": 108},
}


def _entry(path: str, fmt: str, split: str | None, size: int = 10, rows: int = 1) -> FileEntry:
    return FileEntry(path=path, split=split, format=fmt, sha256=SHA, size=size, rows=rows)


def _manifest(rows: dict[str, int], **kw) -> Manifest:
    files = [_entry(f"shards/{'1' * 64}.parquet", "parquet", "train", 900, rows["train"]),
             _entry(f"shards/{'2' * 64}.parquet", "parquet", "eval", 100, rows.get("eval", 0)),
             _entry("versions/v1/README.md", "card", None)]
    return Manifest(dataset="support", version="0123456789abcdef", parent="fedcba9876543210",
                    root="datasets/support", created_at="2026-03-01T00:00:00Z", files=files,
                    rows=rows, schema=formats.schema_json(), source={"project_id": 7,
                    "project_title": "support-prompts", "snapshot_at": "2026-03-01T00:00:00"},
                    stats=STATS, config={"eval_fraction": 0.1}, config_hash="c" * 64, **kw)


def _front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---\n")[1])


# -- pure ----------------------------------------------------------------------------------------
def test_hub_layout_uses_hf_split_names_and_leaves_the_stored_card_out():
    assert hub.local_path(_entry(f"shards/{SHA}.parquet", "parquet", "eval")) == (
        f"data/validation/{SHA}.parquet")
    assert hub.local_path(_entry(f"shards/{SHA}.parquet", "parquet", "train")) == (
        f"data/train/{SHA}.parquet")
    assert hub.local_path(_entry(f"shards/openai/{SHA}.jsonl", "openai_chat", "eval")) == (
        f"openai/validation/{SHA}.jsonl")
    assert hub.local_path(_entry(f"shards/trl/{SHA}.jsonl", "trl", "train")) == (
        f"trl/train/{SHA}.jsonl")
    assert hub.local_path(_entry("versions/v/exclusions.jsonl", "exclusions", None)) == (
        "exclusions.jsonl")
    card = _entry("versions/v/README.md", "card", None)
    assert hub.local_path(card) is None
    assert card not in hub.pulled_files(_manifest({"train": 9, "eval": 1}).files)


def test_size_categories_are_hf_labels():
    assert [hub.size_category(n) for n in (0, 999, 1000, 54_321, 2_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]


def test_languages_are_detected_and_rare_misdetections_are_not_listed():
    english = ["How do I reset my password from the account settings page?"] * 60
    german = ["Wie kann ich mein Passwort auf der Kontoseite zurücksetzen?"] * 40
    french = ["Comment puis-je réinitialiser mon mot de passe ?"] * 2  # 2 of 102: below 5%
    found = hub.detect_languages(english + german + french)
    assert found == {"en": 60, "de": 40}
    assert hub.detect_languages(english + german, sample=60) == {"en": 60}


def test_drops_by_reason_come_from_every_stage():
    assert sorted(hub.drops_by_reason(STATS)) == [
        ("dedup", "exact_duplicate", 6), ("dedup", "near_duplicate", 4),
        ("export", "missing_prompt", 2),
        ("filters", "secret", 3), ("filters", "too_long", 5)]


def test_card_metadata_lineage_and_figures():
    card = hub.build_card(_manifest({"train": 1500, "eval": 150}), license="cc-by-4.0",
                          languages={"en": 90, "de": 10})
    text = str(card)
    meta = _front_matter(text)
    assert meta["license"] == "cc-by-4.0"
    assert meta["language"] == ["de", "en"]
    assert meta["size_categories"] == ["1K<n<10K"]
    assert meta["pretty_name"] == "support"
    assert meta["configs"] == [{"config_name": "default", "default": True, "data_files": [
        {"split": "train", "path": "data/train/*.parquet"},
        {"split": "validation", "path": "data/validation/*.parquet"}]}]
    assert meta["dataset_info"]["splits"] == [
        {"name": "train", "num_examples": 1500, "num_bytes": 900},
        {"name": "validation", "num_examples": 150, "num_bytes": 100}]
    assert {"name": "task_id", "dtype": "int64"} in meta["dataset_info"]["features"]
    assert meta["sftflow"]["version"] == "0123456789abcdef"
    assert meta["sftflow"]["parent"] == "fedcba9876543210"
    assert meta["sftflow"]["config_hash"] == "c" * 64
    assert meta["sftflow"]["source"]["project_title"] == "support-prompts"
    assert "| filters | too_long | 5 |" in text and "| dedup | near_duplicate | 4 |" in text
    assert "en (90 of 100 sampled rows)" in text
    assert "parent version: `fedcba9876543210`" in text
    assert "| validation | 150 | 100 |" in text


def test_card_without_eval_rows_or_languages():
    meta = _front_matter(str(hub.build_card(_manifest({"train": 5, "eval": 0}))))
    assert meta["license"] == hub.DEFAULT_LICENSE == "other"
    assert "language" not in meta
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "data/train/*.parquet"}]


def test_a_credential_in_a_source_url_of_an_older_version_stays_out_of_the_cards():
    """A version written before URLs were redacted may hold ``user:password@`` in
    ``source.labelstudio_url``: neither the pulled Hub card nor the stored card copies it."""
    secret = "pw-93be1c"
    manifest = _manifest({"train": 5, "eval": 1})
    manifest.source["labelstudio_url"] = f"http://ann:{secret}@ls.example:8080?token={secret}"
    text = str(hub.build_card(manifest))
    assert secret not in text and "http://ls.example:8080" in text
    assert _front_matter(text)["sftflow"]["source"]["labelstudio_url"] == "http://ls.example:8080"
    stored = formats.dataset_card(dataset="support", version="v", rows={"train": 5}, sizes={},
                                  stats={}, source=manifest.source, config={})
    assert secret not in stored and "- labelstudio_url: http://ls.example:8080" in stored


# -- real SeaweedFS ------------------------------------------------------------------------------
def _commit(s3, dataset: str, rows) -> str:
    return commit_version(s3, CommitRequest(
        dataset=dataset, rows=rows, config={"eval_fraction": 0.1}, stats=STATS, shard_rows=40,
        source={"project_id": 7, "project_title": "support-prompts",
                "snapshot_at": "2026-03-01T00:00:00"},
    )).version


@pytest.mark.integration
def test_pulled_folder_is_a_hub_repository_plain_load_dataset_reads(s3, tmp_path):
    import datasets
    from huggingface_hub import DatasetCard

    first = _commit(s3, "support", final_rows(60))
    version = _commit(s3, "support", final_rows(100))
    dest = tmp_path / "support"
    out = pull_version(s3, "support", None, dest, license="cc-by-4.0")
    assert out["version"] == version
    assert out["card"] == {"languages": ["en"], "license": "cc-by-4.0", "size_category": "n<1K"}

    ds = datasets.load_dataset(str(dest), cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"train", "validation"}
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (90, 10)
    assert set(ds["validation"]["split"]) == {"eval"}  # the stored column keeps sftflow's name
    assert sorted(p.name for p in (dest / "data").iterdir()) == ["train", "validation"]
    assert not (dest / "README.md.part").exists()

    card = DatasetCard.load(dest / "README.md")
    assert card.data.license == "cc-by-4.0" and card.data.language == ["en"]
    assert card.data.sftflow["parent"] == first and card.data.sftflow["version"] == version
    assert "| filters | too_long | 5 |" in card.text

    # The JSONL copies sit outside the configs, loadable on their own.
    chat = datasets.load_dataset("json", data_files=str(dest / "openai/validation/*.jsonl"),
                                 cache_dir=str(tmp_path / "cache2"))
    assert chat["train"].num_rows == 10

    again = pull_version(s3, "support", version, dest, license="cc-by-4.0")
    assert again["bytes_downloaded"] == 0  # every file already there, checksums equal


@pytest.mark.integration
def test_cli_pull_takes_the_license_from_settings(s3, tmp_path):
    _commit(s3, "cli-hub", final_rows(30))
    env = {**os.environ, "SFTFLOW_S3__BUCKET": s3.bucket, "SFTFLOW_DATASETS__LICENSE": "mit"}
    res = subprocess.run([SFTFLOW, "datasets", "pull", "cli-hub", str(tmp_path / "out"),
                          "--json"], capture_output=True, text=True, timeout=300, env=env,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["card"]["license"] == "mit"
    assert _front_matter((tmp_path / "out/README.md").read_text())["license"] == "mit"
    human = subprocess.run([SFTFLOW, "datasets", "pull", "cli-hub", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=300, env=env, check=False)
    assert "huggingface-cli upload" in human.stdout and "license mit" in human.stdout
