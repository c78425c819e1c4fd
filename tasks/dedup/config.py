"""``DedupConfig``: how rows are compared and when two count as duplicates.

One configuration for every step of ``tasks.dedup``: what is compared (``on``), which kinds of
duplicates are dropped (``exact``, ``near``), how texts are shingled (``ngram``, ``char_ngram``,
``normalize_punctuation``, ``normalize_digits``, ``unspaced_ratio``), the MinHash signature
(``num_perm``, ``seed``) and when a near-duplicate pair is accepted (``threshold``,
``verify_margin``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class DedupConfig(BaseModel):
    """How rows are compared and when two count as duplicates."""

    on: Literal["prompt", "prompt_response"] = Field(
        "prompt_response",
        description="Compare the prompt alone, or prompt and response together.",
    )
    exact: bool = Field(True, description="Drop rows whose normalised text is identical.")
    near: bool = Field(True, description="Drop near-duplicates found with MinHash + LSH.")
    threshold: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="Jaccard similarity of shingle sets at or above which two rows are near-duplicates.",
    )
    ngram: int = Field(5, ge=1, le=64, description="Word n-gram size for text with spaces.")
    char_ngram: int = Field(
        5,
        ge=1,
        le=64,
        description="Character n-gram size for text without spaces (Chinese, Japanese, Thai).",
    )
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash signature length.")
    seed: int = Field(1, ge=0, description="Seed of the MinHash hash functions.")
    normalize_punctuation: bool = Field(
        True,
        description="Near-duplicate shingles ignore punctuation (as datatrove does before "
        "MinHash), so a text retyped with other punctuation stays a near-duplicate. Exact "
        "duplicates still compare the text with its punctuation.",
    )
    normalize_digits: bool = Field(
        False,
        description="Near-duplicate shingles read every run of digits as 0 (as datatrove does "
        "for web text). Off by default: in SFT data a number is often the task itself "
        "('Convert 12 degrees Celsius', 'What is 17 x 23?'), and with it on, prompts that "
        "differ only in their numbers collapse into one row. Exact duplicates always compare "
        "digits.",
    )
    verify_margin: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Pairs whose estimated Jaccard is within this distance of the threshold "
        "are decided by exact Jaccard of their shingles (0: by the estimate alone, faster, "
        "less precise).",
    )
    unspaced_ratio: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="A text is shingled by characters when at least this share of its "
        "non-space characters belongs to scripts written without spaces.",
    )
