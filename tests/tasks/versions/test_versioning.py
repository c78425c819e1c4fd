"""Content-addressed versions on the real S3 (SeaweedFS): commit, reuse, refs CAS, readers,
crashes at every commit step, concurrent commits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sftflow.core.errors import SftflowError
from sftflow.core.hashing import config_hash
from sftflow.tasks.runtime.polling import Backoff, wait_until
from sftflow.tasks.versions.commit import CommitRequest, commit_version
from sftflow.tasks.versions.gc import gc
from sftflow.tasks.versions.manifest import file_key, version_id
from sftflow.tasks.versions.pull import pull_version
from sftflow.tasks.versions.read import (
    data_files,
    diff_versions,
    list_versions,
    load_baseline,
    load_manifest,
)
from sftflow.tasks.versions.refs import latest_version, resolve, set_tag
from tests.tasks._datasets import final_rows

pytestmark = pytest.mark.integration

CFG = {"eval_fraction": 0.1}
ROOT = Path(__file__).parents[3]


def _commit(s3, rows, snapshot_at="2026-01-01T00:00:00", dataset="d", hook=None, **kw):
    return commit_version(s3, CommitRequest(
        dataset=dataset, rows=rows, config=CFG,
        source={"project_id": 1, "snapshot_at": snapshot_at,
                "num_tasks_with_annotations": len(rows)},
        stats={"filters": {"kept": len(rows)}}, shard_rows=kw.pop("shard_rows", 100), **kw),
        hook=hook)


def test_commit_then_rebuild_is_a_noop_and_readers_verify(s3):
    rows = final_rows(450)
    first = _commit(s3, rows)
    assert first.created and first.ref_updated and first.parent is None
    assert first.rows == {"train": 405, "eval": 45}
    assert latest_version(s3, "d") == first.version
    m = load_manifest(s3, "d")  # verify=True: every sha256 checked
    assert m.version == first.version and m.rows == first.rows
    assert {f.format for f in m.files} == {"parquet", "openai_chat", "trl", "card", "exclusions"}
    assert sum(f.rows for f in m.files_of("parquet")) == 450
    version, counters = load_baseline(s3, "d")
    assert version == first.version and counters["num_tasks_with_annotations"] == 450
    assert load_baseline(s3, "nothing-yet") == (None, None)

    again = _commit(s3, list(reversed(rows)), snapshot_at="2026-01-02T00:00:00")
    assert again.version == first.version and not again.created and again.bytes_written == 0


def test_one_percent_new_rows_reuse_shards(s3):
    base = final_rows(2000)
    first = _commit(s3, base)
    second = _commit(s3, base + final_rows(20, start=2000), snapshot_at="2026-01-02")
    assert second.created and second.parent == first.version
    assert second.shards_reused >= 17  # full parent shards kept as they are
    assert second.bytes_written <= 0.10 * first.bytes_written
    d = diff_versions(s3, "d", first.version, second.version)
    assert sum(d["added"].values()) == 20 and sum(d["removed"].values()) == 0
    assert d["unchanged"] == 2000
    changed = [dict(r) for r in base[:1]]
    changed[0]["completion"] += " (edited)"
    from sftflow.tasks.versions import formats

    changed[0]["row_hash"] = formats.row_hash(changed[0])
    third = _commit(s3, changed + base[1:], snapshot_at="2026-01-03")
    d3 = diff_versions(s3, "d", second.version, third.version)
    assert sum(d3["changed"].values()) == 1 and sum(d3["removed"].values()) == 20


def test_corrupted_file_fails_verification_naming_it(s3):
    first = _commit(s3, final_rows(120))
    m = load_manifest(s3, "d", first.version, verify=False)
    shard = m.files_of("parquet")[0]
    s3.put_bytes(file_key(m, shard.path), b"garbage")
    with pytest.raises(SftflowError, match=shard.path.rsplit("/", 1)[-1]):
        load_manifest(s3, "d", first.version)
    with pytest.raises(SftflowError, match="no version or tag"):
        load_manifest(s3, "d", "nope")
    with pytest.raises(SftflowError, match="no version yet"):
        load_manifest(s3, "empty")


def test_tags_data_files_pull_and_load_dataset(s3, tmp_path):
    from datasets import load_dataset

    v = _commit(s3, final_rows(230)).version
    set_tag(s3, "d", "trained-by-job1", v)
    assert resolve(s3, "d", "trained-by-job1") == v
    with pytest.raises(SftflowError):
        set_tag(s3, "d", "x", "0000000000000000")
    m = load_manifest(s3, "d", "trained-by-job1")
    files = {s: data_files(s3, m, s) for s in ("train", "eval")}
    assert all(u.startswith(f"s3://{s3.bucket}/datasets/d/shards/") for u in files["train"])
    ds = load_dataset("parquet", data_files=files, storage_options=s3.fsspec_options(),
                      cache_dir=str(tmp_path / "cache"))
    assert (ds["train"].num_rows, ds["eval"].num_rows) == (207, 23)
    assert set(ds["train"]["split"]) == {"train"}

    out = pull_version(s3, "d", v, tmp_path / "pulled")
    assert out["files"] == len(m.files)
    local = load_dataset(str(tmp_path / "pulled"), cache_dir=str(tmp_path / "cache2"))
    assert (local["train"].num_rows, local["validation"].num_rows) == (207, 23)
    chat = load_dataset("json", data_files={"train": str(tmp_path / "pulled/openai/train/*.jsonl")},
                        cache_dir=str(tmp_path / "cache3"))
    assert chat["train"].num_rows == 207
    assert chat["train"][0]["messages"][1]["role"] == "assistant"


def test_gc_removes_only_unreferenced_objects(s3):
    v = _commit(s3, final_rows(150)).version
    s3.put_bytes("datasets/d/shards/orphan.parquet", b"x" * 10)
    s3.put_bytes("datasets/d/versions/deadbeefdeadbeef/README.md", b"crashed commit")
    young = gc(s3, "d")
    assert young["unreferenced"] == 0 and young["kept_too_young"] == 2
    # Below gc's retention floor only with an explicit floor (tests/tasks/versions/test_gc.py).
    dry = gc(s3, "d", min_age_s=0, min_age_floor_s=0)
    assert dry["unreferenced"] == 2 and dry["deleted"] == 0
    assert s3.head("datasets/d/shards/orphan.parquet") is not None
    done = gc(s3, "d", min_age_s=0, min_age_floor_s=0, dry_run=False)
    assert done["deleted"] == 2 and s3.head("datasets/d/shards/orphan.parquet") is None
    load_manifest(s3, "d", v)  # still complete


def test_older_snapshot_never_replaces_newer_latest(s3):
    new = _commit(s3, final_rows(50), snapshot_at="2026-02-01T00:00:00")
    old = _commit(s3, final_rows(60), snapshot_at="2026-01-01T00:00:00")
    assert old.created and not old.ref_updated and old.superseded_by == new.version
    assert latest_version(s3, "d") == new.version


# -- crashes -------------------------------------------------------------------------------------
_CHILD = r"""
import sys, time
from sftflow.core.settings import Settings
from sftflow.tasks.adapters.s3 import build_s3
from sftflow.tasks.versions.commit import CommitRequest, commit_version
from tests.tasks._datasets import final_rows
bucket, step, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s3 = build_s3(Settings().s3.model_copy(update={"bucket": bucket}))
seen = {"n": 0}
def hook(name):
    if name == step:
        seen["n"] += 1
        if seen["n"] == 1:
            print("PAUSED", flush=True)
            time.sleep(120)  # paused mid-commit until the test kills this process
commit_version(s3, CommitRequest(dataset="d", rows=final_rows(n), config={"eval_fraction": 0.1},
    source={"project_id": 1, "snapshot_at": "2026-03-01"}, stats={}, shard_rows=100), hook=hook)
print("DONE", flush=True)
"""


@pytest.mark.parametrize("step", ["shard", "files", "manifest"])
def test_kill_during_commit_leaves_old_version_and_rerun_completes(s3, step):
    old = _commit(s3, final_rows(300))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, s3.bucket, step, "600"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "PAUSED"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    # Readers still see the old, complete version.
    assert latest_version(s3, "d") == old.version
    load_manifest(s3, "d")
    new_id = version_id((r["row_hash"] for r in final_rows(600)),
                                   config_hash(CFG))
    has_manifest = s3.head(f"datasets/d/versions/{new_id}/manifest.json") is not None
    assert has_manifest == (step == "manifest")
    # A rerun completes the commit.
    rerun = _commit(s3, final_rows(600), snapshot_at="2026-03-01")
    assert rerun.version == new_id and rerun.ref_updated and rerun.created == (not has_manifest)
    m = load_manifest(s3, "d")
    assert m.version == new_id and m.rows == {"train": 540, "eval": 60}
    if not has_manifest:
        assert m.parent == old.version


def test_concurrent_commits_lose_no_ref_update(s3):
    """Six writers, different content, same dataset, at once (threads share nothing but S3)."""
    base = _commit(s3, final_rows(100))
    results, errors = [], []
    barrier = threading.Barrier(6)

    def writer(i: int) -> None:
        try:
            barrier.wait()
            results.append(_commit(s3, final_rows(100 + 10 * (i + 1)),
                                   snapshot_at=f"2026-04-0{i + 1}T00:00:00"))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len({r.version for r in results}) == 6 and all(r.created for r in results)
    newest = max(results, key=lambda r: r.rows["train"] + r.rows["eval"])  # snapshot 04-06
    assert latest_version(s3, "d") == newest.version
    versions = {v["version"] for v in list_versions(s3, "d")}
    assert versions == {base.version} | {r.version for r in results}
    for r in results:
        load_manifest(s3, "d", r.version)  # every one complete and verifiable
        assert r.latest is not None
        # Each writer either moved the ref or saw a version from a newer snapshot there.
        assert r.ref_updated or r.superseded_by is not None


# -- gc beside builds (issue #10, item 4) ---------------------------------------------------------
_BUILD = r"""
import sys
from sftflow.core.settings import Settings
from sftflow.tasks.adapters.s3 import build_s3
from sftflow.tasks.versions.commit import CommitRequest, commit_version
from tests.tasks._datasets import final_rows
bucket, n = sys.argv[1], int(sys.argv[2])
s3 = build_s3(Settings().s3.model_copy(update={"bucket": bucket}))
def hook(name):
    print(name, flush=True)
commit_version(s3, CommitRequest(dataset="d", rows=final_rows(n), config={"eval_fraction": 0.1},
    source={"project_id": 1, "snapshot_at": "2026-03-01"}, stats={}, shard_rows=100), hook=hook)
print("DONE", flush=True)
"""


def _build_process(s3, n: int, failpoints: str) -> subprocess.Popen:
    """A commit of final_rows(n) in its own process, with failpoints; prints each step."""
    return subprocess.Popen([sys.executable, "-c", _BUILD, s3.bucket, str(n)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 "SFTFLOW_FAILPOINTS": failpoints})


def _crashed_build_leaves_orphans(s3, n: int = 600) -> None:
    """A build killed right after uploading its files, before its manifest: its shards and
    version files are orphans (gc may collect them), and a rerun will reuse them."""
    proc = _build_process(s3, n, "versioning.after-files=crash")
    assert proc.wait(120) == -signal.SIGKILL
    assert any(o.key.startswith("datasets/d/versions/") and o.key.endswith("README.md")
               for o in s3.list("datasets/d/"))


def test_gc_while_a_rerun_is_between_its_files_and_its_manifest_leaves_it_complete(s3):
    """The rerun reuses the crashed run's orphans; gc --delete (min age 2 s, the orphans are
    older) runs while the rerun is held after its files, before its manifest."""
    old = _commit(s3, final_rows(300))
    _crashed_build_leaves_orphans(s3)
    time.sleep(3)  # on purpose: the orphans are now older than gc's min age (2 s)
    proc = _build_process(s3, 600, "versioning.after-files=sleep(6)")
    try:
        while (line := proc.stdout.readline().strip()) != "files":
            assert line, "the rerun ended before its files step"
        swept = gc(s3, "d", min_age_s=2, min_age_floor_s=2, dry_run=False)
        assert proc.wait(120) == 0
    finally:
        proc.kill()
    m = load_manifest(s3, "d")  # every listed file there, checksums verified
    assert m.version != old.version and m.rows == {"train": 540, "eval": 60}
    assert swept["deleted"] == 0  # what the rerun reuses was refreshed: too young to collect


def test_gc_stalled_before_its_delete_spares_what_a_build_committed_meanwhile(s3):
    """gc lists the crashed run's orphans as garbage and stalls (failpoint sleep) before
    deleting; meanwhile a rerun commits them into a version and moves refs/latest."""
    from sftflow.core import failpoints

    _commit(s3, final_rows(300))
    _crashed_build_leaves_orphans(s3)
    time.sleep(3)  # on purpose: the orphans are now older than gc's min age (2 s)
    out: dict = {}
    with failpoints.active({"gc.before-delete": "sleep(8)"}):
        sweeper = threading.Thread(target=lambda: out.update(
            gc(s3, "d", min_age_s=2, min_age_floor_s=2, dry_run=False)))
        sweeper.start()
        wait_until(lambda: failpoints._hits["gc.before-delete"], timeout_s=60,
                   backoff=Backoff(0.05, 0.2))
        assert failpoints._hits["gc.before-delete"] == 1  # gc has chosen its garbage
        rerun = _commit(s3, final_rows(600), snapshot_at="2026-03-01")
        sweeper.join(60)
    assert out["unreferenced"] > 0  # the orphans were garbage when gc listed them
    assert latest_version(s3, "d") == rerun.version
    load_manifest(s3, "d")  # complete: nothing it references was deleted


def test_a_parent_with_missing_shards_is_rebuilt_around_not_fatal(s3):
    first = _commit(s3, final_rows(300))
    m = load_manifest(s3, "d", verify=False)
    lost = m.files_of("parquet")[0]
    s3.delete([file_key(m, lost.path)])  # as a gc of the past did
    second = _commit(s3, final_rows(310), snapshot_at="2026-01-02")
    assert second.created and second.parent == first.version
    assert second.parent_missing == [lost.path]  # reported, not silent
    load_manifest(s3, "d")  # the new version is complete


def test_a_rerun_never_points_latest_at_a_version_with_missing_files(s3):
    old = _commit(s3, final_rows(100))

    def stop(name):
        if name == "manifest":
            raise SftflowError("crash after the manifest")

    with pytest.raises(SftflowError, match="crash after"):
        _commit(s3, final_rows(200), hook=stop)
    new_id = version_id((r["row_hash"] for r in final_rows(200)),
                                   config_hash(CFG))
    m = load_manifest(s3, "d", new_id, verify=False)
    s3.delete([file_key(m, m.files_of("parquet")[0].path)])
    with pytest.raises(SftflowError, match="missing.*refs/latest was not moved"):
        _commit(s3, final_rows(200))
    assert latest_version(s3, "d") == old.version


def test_gc_resolves_references_under_the_root_it_collects(s3):
    """The dataset prefix changed: the objects were copied under a new prefix, the manifests
    still say the old root. gc of the new prefix keeps every live file."""
    v = _commit(s3, final_rows(150)).version
    for o in list(s3.list("datasets/d/")):
        s3.put_bytes("moved/" + o.key[len("datasets/"):], s3.get_bytes(o.key)[0])
    s3.delete(o.key for o in list(s3.list("datasets/")))
    done = gc(s3, "d", prefix="moved", min_age_s=0, min_age_floor_s=0, dry_run=False)
    assert done["deleted"] == 0
    assert load_manifest(s3, "d", v, prefix="moved").root == "datasets/d"
