"""sft_pipeline end to end on the real stack: S3 prompts -> Label Studio -> wait -> dataset."""

from __future__ import annotations

import json
import threading
import time

import pytest

from sftflow.flows.pipeline import PipelineParams, sft_pipeline
from sftflow.tasks.adapters.labelstudio import find_project
from tests.conftest import unique

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

PROMPTS = [
    "Explain why the sky looks blue during the day.",
    "Write a haiku about autumn leaves falling in a quiet park.",
    "List three practical uses of a binary search tree.",
    "Summarise the causes of the French Revolution in two sentences.",
]


def annotate_when_ready(client, title: str, n: int, stop: threading.Event) -> None:
    """An annotator: waits for the ingested tasks, then answers ``n`` of them."""
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        project = find_project(client, title)
        tasks = list(client.tasks.list(project=project.id)) if project else []
        if len(tasks) == len(PROMPTS):
            for i, task in enumerate(tasks[:n]):
                client.annotations.create(id=task.id, result=[{
                    "from_name": "instruction", "to_name": "prompt", "type": "textarea",
                    "value": {"text": [f"A careful, complete answer number {i} to: {task.data['prompt']}"]},
                }])
            return
        time.sleep(0.5)  # a poll loop's pause (deadline above); stops when the flow returns


def _run_while_annotating(labelstudio, title: str, params: PipelineParams):
    """Run the pipeline while a thread annotates its first 3 tasks once they exist."""
    stop = threading.Event()
    annotator = threading.Thread(target=annotate_when_ready, args=(labelstudio, title, 3, stop))
    annotator.start()
    try:
        return sft_pipeline(params)
    finally:
        stop.set()
        annotator.join()


def test_pipeline_builds_once_enough_annotations_arrive_and_reruns_cleanly(
    prefect_harness, labelstudio, s3
):
    s3.put_bytes("prompts/batch.jsonl",
                 "\n".join(json.dumps({"prompt": p}) for p in PROMPTS).encode())
    title = unique("t-pipe")
    params = PipelineParams(
        source=f"s3://{s3.bucket}/prompts/", project=title, dataset="pipe", min_new=3,
        wait_timeout_s=120, min_interval_s=0.5, max_interval_s=2, bucket=s3.bucket,
    )
    report = _run_while_annotating(labelstudio, title, params)
    try:
        assert report.ingest["imported"] == 4 and report.wait["reached"]
        assert report.stage == "build" and report.build["created"]
        assert sum(report.build["rows"].values()) == 3

        # Rerun: nothing new to import, nothing new annotated -> stops at the wait, no new version.
        state = sft_pipeline(params.model_copy(update={"wait_timeout_s": 1}), return_state=True)
        again = state.result()
        assert state.name == "NotEnough" and again.stage == "wait"
        assert again.ingest["imported"] == 0 and again.wait["new"] == 0
        assert again.wait["baseline_version"] == report.build["version"]
    finally:
        labelstudio.projects.delete(id=report.ingest["project_id"])


def test_pipeline_build_takes_the_datasets_s3_lock_over_a_dead_holder(prefect_harness, labelstudio, s3):
    """The build lock is the dataset's lock record in the bucket (not a Prefect concurrency
    limit, whose leases a server restart loses): a holder that died holding it delays the
    build by its lease only, and the build leaves it released with the next fencing token."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from sftflow.tasks.versions.locks import (
        LeaseLost,
        LockRecord,
        build_lock,
        build_lock_name,
        lock_key,
    )

    s3.put_bytes("prompts/batch.jsonl",
                 "\n".join(json.dumps({"prompt": p}) for p in PROMPTS).encode())
    title, dataset = unique("t-pipe-lock"), unique("pipe-lock")
    dead = build_lock(s3, dataset, lease_s=2)
    assert dead.try_acquire()  # then never renewed: a killed build
    params = PipelineParams(
        source=f"s3://{s3.bucket}/prompts/", project=title, dataset=dataset, min_new=3,
        wait_timeout_s=120, min_interval_s=0.5, max_interval_s=2, bucket=s3.bucket,
        build_lock_timeout_s=60,
    )
    report = _run_while_annotating(labelstudio, title, params)
    try:
        assert report.stage == "build" and report.build["created"]
        lock = LockRecord.model_validate_json(
            s3.get_bytes(lock_key("_sftflow", build_lock_name(dataset)))[0])
        assert lock.token == 2 and lock.released and lock.owner != dead.owner
        with pytest.raises(LeaseLost):
            dead.fence()
        with get_client(sync_client=True) as client, pytest.raises(ObjectNotFound):
            client.read_global_concurrency_limit_by_name(build_lock_name(dataset))
    finally:
        labelstudio.projects.delete(id=report.ingest["project_id"])
