"""Point Prefect at the configured API for the duration of a CLI command.

Without it a flow called from the CLI would start Prefect's ephemeral server. An explicit
``PREFECT_API_URL`` in the environment (or the active Prefect profile) wins over the settings.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from sftflow.core.settings import Settings


@contextmanager
def prefect_api(settings: Settings) -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    current = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if current:
        yield current
        return
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect.api_url}):
        yield settings.prefect.api_url
