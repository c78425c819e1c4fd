"""The scheduled check on the real stack: when a Label Studio project crosses its threshold the
build run it starts carries every setting the check was given, the bucket included, so the
version lands where the deployments are configured, not in the default bucket.

The deployments are those of ``deployments/serve.py``, applied to the Prefect test harness;
no runner polls it, so the build run the check creates is executed here with the parameters
Prefect stored for it.
"""

from __future__ import annotations

import pytest

from sftflow.core.settings import get_settings
from sftflow.deployments.serve import BUILD, CHECK, ServeConfig, build_deployments
from sftflow.flows.build_dataset import BuildParams, build_dataset
from sftflow.flows.check_annotations import CheckParams, check_annotations
from sftflow.tasks.ingest.projects import SFT_LABEL_CONFIG
from sftflow.tasks.versions.read import load_manifest
from sftflow.tasks.versions.refs import latest_version
from tests.conftest import unique

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

MIN_NEW = 2
WORDS = ["amber", "basil", "cedar", "delta"]


@pytest.fixture()
def project(labelstudio):
    """A project with four tasks, two of them annotated through the API: over MIN_NEW."""
    p = labelstudio.projects.create(title=unique("t-check"), label_config=SFT_LABEL_CONFIG)
    ids = labelstudio.projects.import_tasks(
        id=p.id, request=[{"prompt": f"What does the word {w} mean here?"} for w in WORDS],
        return_task_ids=True,
    ).task_ids
    for task_id, word in zip(ids[:MIN_NEW], WORDS, strict=False):
        labelstudio.annotations.create(id=task_id, result=[{
            "from_name": "instruction", "to_name": "prompt", "type": "textarea",
            "value": {"text": [f"The word {word} names a thing; here it means its colour."]}}])
    yield p
    labelstudio.projects.delete(id=p.id)


def _deployment(deployment_id):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment_id)


def _flow_run(run_id: str):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def test_the_build_a_check_starts_keeps_the_configured_bucket(prefect_harness, s3, project):
    assert s3.bucket != get_settings().s3.bucket  # a bucket other than the default one
    dataset = unique("d")
    cfg = ServeConfig(source=f"s3://{s3.bucket}/prompts/", project=project.title,
                      dataset=dataset, min_new=MIN_NEW, bucket=s3.bucket)
    ids = {d.name: d.apply() for d in build_deployments(cfg)}
    check_params = _deployment(ids[CHECK]).parameters["params"]
    assert check_params["bucket"] == s3.bucket

    report = check_annotations(CheckParams.model_validate(check_params))
    assert report.reached and report.build_flow_run_id

    run = _flow_run(report.build_flow_run_id)
    assert str(run.deployment_id) == str(ids[BUILD])
    params = run.parameters["params"]
    assert params["bucket"] == s3.bucket
    assert params["dataset"] == dataset and params["project"] == str(project.id)

    built = build_dataset(BuildParams.model_validate(params))  # what a runner would execute
    assert built.created and built.version
    assert latest_version(s3, dataset) == built.version
    assert load_manifest(s3, dataset, built.version).source["project_id"] == project.id
