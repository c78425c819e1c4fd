"""``pull_version`` into a folder already used (real SeaweedFS): the folder ends up holding
exactly one version, never a mix; a folder that is not an earlier pull is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftflow.core.errors import SftflowError
from sftflow.tasks.versions import hub
from sftflow.tasks.versions.pull import pull_version
from sftflow.tasks.versions.read import load_manifest
from tests.tasks._finetune import make_version

pytestmark = pytest.mark.integration


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def expected_files(s3, dataset: str, version: str) -> set[str]:
    m = load_manifest(s3, dataset, version, verify=False)
    return {hub.local_path(f) for f in hub.pulled_files(m.files)} | {
        hub.CARD, "manifest.json", ".sftflow-pull.json"}


def row_hashes(s3, dataset: str, version: str) -> list[str]:
    from sftflow.tasks.versions.read import read_rows

    m = load_manifest(s3, dataset, version, verify=False)
    return sorted(h for f in m.files_of("parquet")
                  for h in read_rows(s3, m, f, columns=["row_hash"]).column(0).to_pylist())


def test_a_second_pull_into_the_same_folder_leaves_only_the_second_version(s3, tmp_path):
    import datasets

    a = make_version(s3, "p", 40, eval_every=5)
    b = make_version(s3, "p", 30, eval_every=5, start=100)
    dest = tmp_path / "pulled"
    pull_version(s3, "p", a, dest)
    assert files_in(dest) == expected_files(s3, "p", a)

    out = pull_version(s3, "p", b, dest)
    assert out["version"] == b and out["replaced"] == {"dataset": "p", "version": a}
    assert files_in(dest) == expected_files(s3, "p", b)  # nothing of version a is left
    marker = json.loads((dest / ".sftflow-pull.json").read_text())
    assert (marker["dataset"], marker["version"]) == ("p", b)
    ds = datasets.load_dataset(str(dest), cache_dir=str(tmp_path / "cache"))
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (24, 6)
    pulled = [*ds["train"]["row_hash"], *ds["validation"]["row_hash"]]
    assert sorted(pulled) == row_hashes(s3, "p", b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "pulled"]  # no temp left

    again = pull_version(s3, "p", b, dest)  # the same version again: nothing downloaded
    assert again["bytes_downloaded"] == 0 and files_in(dest) == expected_files(s3, "p", b)


def test_a_pull_failing_midway_leaves_the_earlier_pull_whole(s3, tmp_path):
    a = make_version(s3, "p", 40, eval_every=5)
    b = make_version(s3, "p", 30, eval_every=5, start=100)
    dest = tmp_path / "pulled"
    pull_version(s3, "p", a, dest)
    before = {n: (dest / n).read_bytes() for n in files_in(dest)}
    mb = load_manifest(s3, "p", b, verify=False)
    shard = mb.files_of("parquet", "train")[0]
    s3.put_bytes(mb.key(shard.path), b"not the bytes the manifest names")
    with pytest.raises(SftflowError, match="checksum mismatch"):
        pull_version(s3, "p", b, dest)
    assert {n: (dest / n).read_bytes() for n in files_in(dest)} == before  # still exactly a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pulled"]


def test_a_non_empty_folder_that_is_not_a_pull_is_refused_unless_forced(s3, tmp_path):
    version = make_version(s3, "p", 20)
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(SftflowError, match="not empty and holds no earlier sftflow pull"):
        pull_version(s3, "p", version, dest)
    assert files_in(dest) == {"notes.txt"}
    (dest / ".sftflow-pull.json").write_text("{damaged")  # a marker that does not parse
    with pytest.raises(SftflowError, match="--force"):
        pull_version(s3, "p", version, dest)

    out = pull_version(s3, "p", version, dest, force=True)
    assert out["replaced"] is None and files_in(dest) == expected_files(s3, "p", version)


def test_an_empty_folder_and_a_new_one_are_fine(s3, tmp_path):
    version = make_version(s3, "p", 20)
    (tmp_path / "empty").mkdir()
    for dest in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        out = pull_version(s3, "p", version, dest)
        assert out["replaced"] is None and files_in(dest) == expected_files(s3, "p", version)
