"""A dataset version as a Hugging Face ``datasets.DatasetDict``, read from the bucket.

``sftflow.load_dataset("support")`` is the one call a data scientist needs: the latest version
(or a version id or tag), every Parquet shard checked against the manifest's sha256 as it is
downloaded, split names as HF users expect them (``train``, ``validation``; sftflow's own name
for the second is ``eval``). Only the Parquet shards are read, not the JSONL copies.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from sftflow.core.settings import Settings, get_settings
from sftflow.tasks.versions.hub import HF_SPLITS

if TYPE_CHECKING:
    import datasets


def load_dataset(
    name: str, version: str | None = None, *, bucket: str | None = None,
    settings: Settings | None = None,
) -> datasets.DatasetDict:
    """Version ``version`` (id, tag, or None for ``refs/latest``) of dataset ``name``."""
    import datasets
    import pyarrow as pa

    from sftflow.tasks.adapters.clients import Clients
    from sftflow.tasks.versions.manifest import FileEntry
    from sftflow.tasks.versions.read import load_manifest, read_rows

    settings = (settings or get_settings()).with_bucket(bucket)
    s3 = Clients(settings).s3
    manifest = load_manifest(s3, name, version, verify=False, prefix=settings.datasets.prefix)

    def read(entry: FileEntry) -> pa.Table:
        return read_rows(s3, manifest, entry)  # verified, deleted rows left out

    out = {}
    with ThreadPoolExecutor(8) as pool:
        for split, hf_split in HF_SPLITS.items():
            tables = list(pool.map(read, manifest.files_of("parquet", split)))
            if tables:
                out[hf_split] = datasets.Dataset(pa.concat_tables(tables))
    return datasets.DatasetDict(out)
