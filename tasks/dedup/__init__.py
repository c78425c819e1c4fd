"""Deduplication and the cluster-aware split: numpy and numba, no services, no Prefect.

Flows wrap these functions in tasks (``fingerprint`` per shard, ``cluster``/``deduplicate``
once on the driver). The pipeline, one module per step:

- ``config``: ``DedupConfig``, how rows are compared.
- ``text``: normalisation, the compared text of a row, the shingle set (reference definition).
- ``shingling``: the same shingles hashed for a whole batch at once, and exact keys.
- ``kernel``: the compiled loops (one pass per text; pair agreement; connected components).
- ``minhash``: MinHash fingerprints, LSH candidate pairs, verified similar pairs.
- ``clustering``: clusters of duplicates and the keep rule (``deduplicate``).
- ``stable``: the keep rule of a version built on its parent's rows.
- ``split``: train/eval by dedup cluster (joined through shared prompts), the leakage check.
- ``hashing``: the 64-bit hashing primitives they share.
"""

from sftflow.tasks.dedup.clustering import DedupResult, cluster, deduplicate
from sftflow.tasks.dedup.config import DedupConfig
from sftflow.tasks.dedup.minhash import (
    Fingerprints,
    candidate_pairs,
    exact_jaccard,
    fingerprint,
    lsh_params,
    signatures,
    similar_pairs,
)
from sftflow.tasks.dedup.split import (
    Split,
    SplitLeakage,
    assign_splits,
    leakage,
    split_by_cluster,
    split_groups,
)
from sftflow.tasks.dedup.text import dedup_text, is_unspaced, normalize, shingles

__all__ = [
    "DedupConfig",
    "DedupResult",
    "Fingerprints",
    "Split",
    "SplitLeakage",
    "assign_splits",
    "candidate_pairs",
    "cluster",
    "dedup_text",
    "deduplicate",
    "exact_jaccard",
    "fingerprint",
    "is_unspaced",
    "leakage",
    "lsh_params",
    "normalize",
    "shingles",
    "signatures",
    "similar_pairs",
    "split_by_cluster",
    "split_groups",
]
