"""``sftflow datasets list|pull|gc`` as a user runs them (the installed command, a real bucket):
damaged manifests named without hiding the rest, pulls that never mix two versions, gc's
retention floor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tasks._finetune import make_version

pytestmark = pytest.mark.integration

SFTFLOW = str(Path(sys.executable).parent / "sftflow")


def run(s3, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SFTFLOW, *args, "--bucket", s3.bucket], check=False, capture_output=True, text=True,
        timeout=300, env={**os.environ, **(env or {})},
    )


def test_list_names_a_damaged_manifest_and_lists_the_rest(s3):
    alpha = [make_version(s3, "alpha", 30), make_version(s3, "alpha", 40, start=1)]
    beta = [make_version(s3, "beta", 30), make_version(s3, "beta", 40, start=1)]
    key = f"datasets/alpha/versions/{alpha[1]}/manifest.json"
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=b"garbage, not a manifest")

    res = run(s3, "datasets", "list", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["datasets"] == [
        {"dataset": "alpha", "latest": alpha[1], "rows": None},
        {"dataset": "beta", "latest": beta[1], "rows": {"train": 32, "eval": 8}},
    ]
    assert [(d["dataset"], d["key"]) for d in out["damaged"]] == [("alpha", key)]
    assert "not valid JSON" in out["damaged"][0]["reason"]
    assert key in res.stderr and "Traceback" not in res.stderr  # a warning names it

    versions = run(s3, "datasets", "list", "alpha", "--json")
    assert versions.returncode == 0, versions.stderr
    out = json.loads(versions.stdout)
    assert [v["version"] for v in out["versions"]] == [alpha[0]]
    assert [d["key"] for d in out["damaged"]] == [key]

    human = run(s3, "datasets", "list")
    assert human.returncode == 0 and "beta" in human.stdout and key in human.stderr
    strict = run(s3, "datasets", "list", "--strict")
    assert strict.returncode == 1 and "beta" in strict.stdout and key in strict.stderr
    assert run(s3, "datasets", "list", "beta", "--strict").returncode == 0


def test_pull_refuses_a_folder_that_is_not_an_earlier_pull_unless_forced(s3, tmp_path):
    version = make_version(s3, "p", 20)
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    res = run(s3, "datasets", "pull", "p", str(dest))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "--force" in res.stderr and str(dest) in res.stderr
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]

    forced = run(s3, "datasets", "pull", "p", str(dest), "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert not (dest / "notes.txt").exists()
    marker = json.loads((dest / ".sftflow-pull.json").read_text())
    assert (marker["dataset"], marker["version"]) == ("p", version)


def test_gc_refuses_a_min_age_below_the_retention_floor(s3):
    make_version(s3, "g", 20)
    res = run(s3, "datasets", "gc", "g", "--delete", "--min-age-s", "0")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "retention floor of 3600 s" in res.stderr
    # The floor moves only by an explicit setting.
    lowered = run(s3, "datasets", "gc", "g", "--min-age-s", "0", "--json",
                  env={"SFTFLOW_DATASETS__GC_MIN_AGE_FLOOR_S": "0"})
    assert lowered.returncode == 0, lowered.stderr
    assert json.loads(lowered.stdout)["dry_run"]
