"""Every external service behind one object, built in one place from the settings.

Flows build ``Clients`` once at their entry point and hand ``clients.s3`` /
``clients.labelstudio`` to tasks; tasks never read environment variables.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from sftflow.core.settings import Settings, get_settings

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

    from sftflow.tasks.adapters.s3 import S3


@dataclass
class Clients:
    settings: Settings = field(default_factory=get_settings)

    @classmethod
    def for_bucket(cls, bucket: str | None) -> Clients:
        """Clients of the configured settings, with another default bucket if one is given."""
        return cls(get_settings().with_bucket(bucket))

    @cached_property
    def s3(self) -> S3:
        from sftflow.tasks.adapters.s3 import build_s3

        return build_s3(self.settings.s3)

    @cached_property
    def labelstudio(self) -> LabelStudio:
        from sftflow.tasks.adapters.labelstudio import build_labelstudio

        return build_labelstudio(self.settings.labelstudio)

@contextmanager
def prefect_api(settings: Settings) -> Iterator[str]:
    """Point Prefect at the configured API for the duration of a command (otherwise a flow
    called from the CLI or the demo starts Prefect's ephemeral server). An explicit
    ``PREFECT_API_URL`` in the environment (or the active Prefect profile) wins."""
    import os

    from prefect.settings import PREFECT_API_URL, temporary_settings

    current = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if current:
        yield current
        return
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect.api_url}):
        yield settings.prefect.api_url
