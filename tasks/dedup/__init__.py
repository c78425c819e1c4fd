"""Deduplication and the cluster-aware split: pure numpy, no services, no Prefect.

- ``minhash``: normalisation, shingles, MinHash fingerprints, LSH clustering, the keep rule.
- ``split``: train/eval by dedup cluster (joined through shared prompts), the leakage check.
"""

from sftflow.tasks.dedup.minhash import (
    DedupConfig,
    DedupResult,
    Fingerprints,
    candidate_pairs,
    cluster,
    dedup_text,
    deduplicate,
    exact_jaccard,
    fingerprint,
    is_unspaced,
    lsh_params,
    normalize,
    shingles,
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
