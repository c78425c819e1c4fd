"""sftflow: human annotations to fine-tuned models, orchestrated by Prefect 3.

``sftflow.load_dataset(name, version=None)`` returns a dataset version as a
``datasets.DatasetDict`` (``train`` and ``validation``); everything else is the ``sftflow`` CLI
and the Prefect flows (see README.md and docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

__version__ = "0.1.0"


def load_dataset(name: str, version: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    """Version ``version`` (id, tag, or None: the latest) of dataset ``name`` from the bucket,
    checksums verified, as a ``datasets.DatasetDict``; ``bucket=`` for another bucket."""
    from sftflow.tasks.versions.hf_datasets import load_dataset as load

    return load(name, version, **kwargs)
