"""The Label Studio adapter against the real server (integration): ``post_json``, the import
path that bypasses the SDK's body encoder."""

from __future__ import annotations

import datetime as dt

import pytest
from label_studio_sdk.core.api_error import ApiError

from sftflow.tasks.adapters.labelstudio import post_json

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
