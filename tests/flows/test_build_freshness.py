"""Issue #18 item 1 on the real stack: every build path takes the dataset's build lock, and
``refs/latest`` never moves back to a build that read Label Studio earlier than the version it
names, even when that build lost its lock while frozen and commits late."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sftflow.flows.build_dataset import BuildParams, build_dataset
from sftflow.tasks.runtime.polling import Backoff, wait_until
from sftflow.tasks.versions.keys import DEFAULT_PREFIX, DatasetKeys
from sftflow.tasks.versions.locks import (
    LockRecord,
    LockTimeout,
    build_lock,
    build_lock_name,
    lock_key,
)
from sftflow.tasks.versions.read import load_manifest
from sftflow.tasks.versions.refs import latest_version
from tests.conftest import unique
from tests.tasks._datasets import annotation, make_project

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

ROOT = Path(__file__).parents[2]

STALLED_BUILD = """
import sys
from sftflow.flows.build_dataset import BuildParams, build_dataset
report = build_dataset(BuildParams(project=sys.argv[1], dataset=sys.argv[2], bucket=sys.argv[3]))
print("REPORT " + report.model_dump_json())
"""  # its lock lease comes from the setting locks.lease_s (SFTFLOW_LOCKS__LEASE_S)


def _qa(i: int) -> dict:
    words = ["amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "heron", "iris",
             "jade", "kite", "lotus", "maple", "nectar"]
    w = words[i % len(words)]
    return {"data": {"prompt": f"In one sentence, what is a {w} {words[(i * 3 + 1) % 14]}?"},
            "annotations": [annotation(f"A {w} {words[(i * 3 + 1) % 14]} is the thing "
                                       f"called {words[(i * 5 + 2) % 14]} in context {w}.")]}


@pytest.fixture()
def stack_prefect(stack):
    """The local stack's Prefect server, shared by a build in a subprocess and this process."""
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = stack.prefect.api_url
    try:
        httpx.get(f"{url}/health", timeout=5).raise_for_status()
    except httpx.HTTPError:
        pytest.skip(f"the stack's Prefect server at {url} is not running (sftflow stack up)")
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


def _manifests(s3, dataset: str) -> int:
    root = DatasetKeys.of(DEFAULT_PREFIX, dataset).root
    return sum(1 for o in s3.list(f"{root}/versions/") if o.key.endswith("/manifest.json"))


def test_a_build_frozen_past_its_lease_commits_late_and_latest_stays_on_the_fresher_one(
        stack_prefect, s3, labelstudio):
    """A (incremental) reads Label Studio, writes its manifest and freezes (SIGSTOP: a stalled
    VM or a GC pause) past its build lock's lease; B takes the lock over, reads two more
    annotated tasks and commits. A then resumes and commits: refs/latest must stay on B, and
    A reports that it is not latest (so it is not announced)."""
    p = make_project(labelstudio, unique("t-fresh"), [_qa(i) for i in range(6)])
    dataset = unique("fresh")
    params = BuildParams(project=str(p.id), dataset=dataset, bucket=s3.bucket)
    try:
        base = build_dataset(params)
        assert base.version and base.ref_updated
        labelstudio.projects.import_tasks(id=p.id, request=[_qa(6), _qa(7)])
        env = {**os.environ, "PREFECT_API_URL": stack_prefect, "SFTFLOW_LOCKS__LEASE_S": "3",
               "SFTFLOW_FAILPOINTS": "versioning.after-manifest=sleep(30)"}
        a = subprocess.Popen([sys.executable, "-c", STALLED_BUILD, str(p.id), dataset, s3.bucket],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert wait_until(lambda: _manifests(s3, dataset) == 2 or a.poll() is not None,
                              timeout_s=240, backoff=Backoff(0.2, 0.5))
            assert a.poll() is None, a.communicate()[1].decode()[-3000:]
            os.kill(a.pid, signal.SIGSTOP)  # frozen after its manifest, before refs/latest
            labelstudio.projects.import_tasks(id=p.id, request=[_qa(8), _qa(9)])
            b = build_dataset(params)  # takes A's lock over once its 3 s lease has run out
        finally:
            os.kill(a.pid, signal.SIGCONT)
            out, err = a.communicate(timeout=300)
        assert a.returncode == 0, err.decode()[-3000:]
    finally:
        labelstudio.projects.delete(id=p.id)
    late = json.loads(next(line for line in out.decode().splitlines()
                           if line.startswith("REPORT "))[len("REPORT "):])
    assert b.ref_updated and b.mode == "incremental" and sum(b.rows.values()) == 10
    assert late["mode"] == "incremental" and sum(late["rows"].values()) == 8
    assert late["version"] != b.version and late["parent"] == base.version
    assert not late["ref_updated"] and late["latest"] == b.version
    assert latest_version(s3, dataset) == b.version
    mark = {v: load_manifest(s3, dataset, v, verify=False).source["watermark"]
            for v in (late["version"], b.version)}
    assert mark[late["version"]] < mark[b.version]
    keys = DatasetKeys.of(DEFAULT_PREFIX, dataset)
    assert s3.head(keys.announced(late["version"])) is None  # never announced


def test_a_build_without_the_pipeline_waits_for_the_datasets_build_lock(
        prefect_harness, s3, labelstudio):
    """The flow the CLI and the build-dataset deployment run takes the dataset's build lock
    itself: while another holder keeps it, the build waits (here past its timeout: it gives up
    and writes nothing); once released, the build takes it with the next fencing token."""
    p = make_project(labelstudio, unique("t-lock"), [_qa(i) for i in range(4)])
    dataset = unique("lock")
    params = BuildParams(project=str(p.id), dataset=dataset, bucket=s3.bucket, lock_timeout_s=4)
    holder = build_lock(s3, dataset, lease_s=30)
    try:
        with holder.held(5):
            with pytest.raises(LockTimeout, match=build_lock_name(dataset)):
                build_dataset(params)
            assert latest_version(s3, dataset) is None and _manifests(s3, dataset) == 0
        report = build_dataset(params)
    finally:
        labelstudio.projects.delete(id=p.id)
    assert report.ref_updated and sum(report.rows.values()) == 4
    lock = LockRecord.model_validate_json(
        s3.get_bytes(lock_key("_sftflow", build_lock_name(dataset)))[0])
    assert lock.token == holder.token + 1 and lock.released and lock.owner != holder.owner
