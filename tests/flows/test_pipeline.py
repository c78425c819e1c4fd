"""sft_pipeline end to end on the real stack: S3 prompts -> Label Studio -> wait -> dataset."""

from __future__ import annotations

import json
import threading
import time

import pytest

from sftflow.flows.pipeline import PipelineParams, sft_pipeline
from sftflow.tasks.labelstudio import find_project
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
        time.sleep(0.5)


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
    stop = threading.Event()
    annotator = threading.Thread(target=annotate_when_ready, args=(labelstudio, title, 3, stop))
    annotator.start()
    try:
        report = sft_pipeline(params)
    finally:
        stop.set()
        annotator.join()
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
