"""The Label Studio adapter against the real server (integration): ``post_json``, the import
path that bypasses the SDK's body encoder; finding a project and reading its counters."""

from __future__ import annotations

import datetime as dt

import pytest
from label_studio_sdk.core.api_error import ApiError

from sftflow.core.errors import ConfigError
from sftflow.tasks.adapters.labelstudio import find_project, post_json, project_counters

pytestmark = pytest.mark.integration


def test_post_json_imports_what_the_sdk_would_and_names_the_new_tasks(labelstudio, project):
    when = dt.datetime(2026, 12, 6, 23, 5, tzinfo=dt.UTC)
    body = [{"data": {"prompt": "Grüße, 世界", "prompt_id": "p1", "at": when}},
            {"data": {"prompt": "second", "prompt_id": "p2", "at": None}}]
    answer = post_json(labelstudio, f"api/projects/{project.id}/import", body,
                       params={"return_task_ids": "true"})
    assert answer["task_count"] == 2 and len(answer["task_ids"]) == 2
    first = labelstudio.tasks.get(id=answer["task_ids"][0])
    # Non-ASCII text unchanged; a datetime encoded as the SDK encodes it (ISO 8601, "Z").
    assert first.data == {"prompt": "Grüße, 世界", "prompt_id": "p1", "at": "2026-12-06T23:05:00Z"}


def test_post_json_raises_the_sdks_error_with_status_and_body(labelstudio, project):
    with pytest.raises(ApiError) as err:  # the project's config needs $prompt
        post_json(labelstudio, f"api/projects/{project.id}/import", [{"data": {"text": "x"}}])
    assert err.value.status_code == 400 and "prompt" in str(err.value.body)


def test_a_project_found_by_title_without_counters_is_found_with_its_config(labelstudio, project):
    # Before: asked for its task number only, Label Studio left out the title, so no project
    # was ever found this way (ingest then created a project and deleted it again, every run).
    found = find_project(labelstudio, project.title, counters=False)
    assert found is not None and found.id == project.id
    whole = labelstudio.projects.get(id=project.id)
    # what ingest reads of it: the config it checks and the creation time its ledger keys on
    assert (found.label_config, found.created_at) == (whole.label_config, whole.created_at)


def test_project_counters_are_the_projects_own(labelstudio, project):
    labelstudio.projects.import_tasks(id=project.id, request=[{"prompt": "a"}, {"prompt": "b"}])
    full = labelstudio.projects.get(id=project.id)
    assert project_counters(labelstudio, project.id) == {
        k: int(getattr(full, k) or 0) for k in (
            "task_number", "num_tasks_with_annotations", "total_annotations_number",
            "finished_task_number", "skipped_annotations_number")}
    assert project_counters(labelstudio, project.id)["task_number"] == 2
    with pytest.raises(ConfigError, match="does not exist"):
        project_counters(labelstudio, 10**9)
