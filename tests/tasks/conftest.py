"""Fixtures shared by the tests of ``tasks/``."""

from __future__ import annotations

import pytest

from tests.conftest import unique


@pytest.fixture()
def project(labelstudio):
    """An empty Label Studio project with the SFT interface, deleted afterwards."""
    from sftflow.tasks.ingest.projects import SFT_LABEL_CONFIG

    p = labelstudio.projects.create(title=unique("t"), label_config=SFT_LABEL_CONFIG)
    yield p
    labelstudio.projects.delete(id=p.id)
