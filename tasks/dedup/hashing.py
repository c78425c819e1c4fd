"""64-bit hashing primitives shared by the dedup steps: ``U64`` and the ``mix64`` finaliser.

Pure numpy, wrapping mod 2**64. Shingle hashes, LSH band buckets and the split's group hashes
are all scrambled by ``mix64``.
"""

from __future__ import annotations

import numpy as np

U64 = np.uint64


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on a uint64 array (wraps mod 2**64)."""
    x ^= x >> U64(30)
    x *= U64(0xBF58476D1CE4E5B9)
    x ^= x >> U64(27)
    x *= U64(0x94D049BB133111EB)
    x ^= x >> U64(31)
    return x
