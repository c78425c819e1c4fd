"""No credential reaches what a build stores: a Label Studio URL setting with a password in it
(``http://user:secret@host:port``) is recorded without it in every object the version writes,
in the Hub folder ``sftflow datasets pull`` makes of it, and in the build's report.

Label Studio refuses requests whose URL carries userinfo (httpx turns it into a Basic
``Authorization`` header that replaces the token: 401). So the setting carries the userinfo,
as a user would configure it, and the client talks to the same real server at the URL without
it: the userinfo reaches only the path that records the URL.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest

from sftflow.core.settings import get_settings
from sftflow.flows.build_dataset import BuildParams, build_dataset
from sftflow.tasks.adapters import labelstudio as labelstudio_adapter
from sftflow.tasks.versions.pull import pull_version
from sftflow.tasks.versions.read import load_manifest
from tests.conftest import unique
from tests.tasks._datasets import annotation, make_project

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

USER, SECRET = "sftuser-3b9d", "pw-s3cr3t-7f1c2a"


@pytest.fixture()
def credentialed_url(monkeypatch, stack):
    """``SFTFLOW_LABELSTUDIO__URL`` with ``user:secret@``; the client connects without it."""
    real = stack.labelstudio.url.rstrip("/")
    parts = urlsplit(real)
    monkeypatch.setenv("SFTFLOW_LABELSTUDIO__URL",
                       f"{parts.scheme}://{USER}:{SECRET}@{parts.netloc}{parts.path}")
    build = labelstudio_adapter.build_labelstudio
    monkeypatch.setattr(labelstudio_adapter, "build_labelstudio",
                        lambda cfg: build(cfg.model_copy(update={"url": real})))
    get_settings.cache_clear()
    assert SECRET in get_settings().labelstudio.url
    yield real
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture()
def project(labelstudio):
    tasks = [{"data": {"prompt": f"Question number {w}: what is it?"},
              "annotations": [annotation(f"The answer about {w} is a careful sentence.")]}
             for w in ("amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "heron")]
    tasks.append({"data": {"prompt": "Empty answer"}, "annotations": [annotation("   ")]})
    p = make_project(labelstudio, unique("t-redact"), tasks)
    yield p
    labelstudio.projects.delete(id=p.id)


def _holding_secret(blobs: dict[str, bytes]) -> list[str]:
    return [name for name, data in blobs.items()
            if SECRET.encode() in data or f"{USER}:".encode() in data]


def test_a_password_in_the_label_studio_url_reaches_no_stored_object(
    prefect_harness, s3, project, credentialed_url, tmp_path
):
    report = build_dataset(BuildParams(project=project.title, dataset="qa", bucket=s3.bucket))
    assert report.created and report.version

    manifest = load_manifest(s3, "qa", report.version)
    assert manifest.source["labelstudio_url"] == credentialed_url  # recorded, without userinfo
    assert manifest.files_of("exclusions") and manifest.files_of("card")
    stored = {o.key: s3.get_bytes(o.key)[0] for o in s3.list("")}  # every object of the build
    assert any(key.endswith("/manifest.json") for key in stored)
    assert _holding_secret(stored) == []

    pull_version(s3, "qa", report.version, tmp_path / "hub")
    pulled = {str(p.relative_to(tmp_path)): p.read_bytes()
              for p in (tmp_path / "hub").rglob("*") if p.is_file()}
    assert "hub/README.md" in pulled and _holding_secret(pulled) == []

    assert SECRET not in json.dumps(report.model_dump(mode="json"))
