"""Shingle hashes of a batch of texts at once: one 64-bit hash per shingle, and exact keys.

The batch counterpart of ``text.shingles``: texts are pre-normalised one by one in Python
(``prepare``: NFKC and casefold where not ASCII), concatenated as UTF-8 bytes, and the rest
(whitespace, A-Z to a-z, punctuation and digits by code point, tokens, shingles, their hashes)
is one compiled pass per text over those bytes (``kernel``). Shingles are hashed with
polynomial prefix hashes, salted by the seed and scrambled. The exact key of a text (a 63-bit
hash of its normalised text, punctuation kept) comes out of the same pass. This module holds
the tables the kernel reads and builds its arguments (``batch_inputs``).
"""

from __future__ import annotations

import unicodedata

import numpy as np

from sftflow.tasks.dedup.config import DedupConfig
from sftflow.tasks.dedup.hashing import U64, mix64
from sftflow.tasks.dedup.kernel import shingle_hashes_batch
from sftflow.tasks.dedup.text import char_classes

_BASE = U64(0x9E3779B97F4A7C15 | 1)  # odd: invertible mod 2**64

_POWERS: list[np.ndarray] = []  # [BASE**i, BASE**-i], grown by doubling, shared by all calls


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**i and BASE**-i mod 2**64 for i < n."""
    if not _POWERS or len(_POWERS[0]) < n:
        size = 1 << max(20, int(n - 1).bit_length())
        inv = U64(pow(int(_BASE), -1, 2**64))
        tables = []
        for factor in (_BASE, inv):
            t = np.full(size, factor, dtype=U64)
            t[0] = 1
            with np.errstate(over="ignore"):
                np.multiply.accumulate(t, out=t)
            tables.append(t)
        _POWERS[:] = tables
    return _POWERS[0][:n], _POWERS[1][:n]


# Byte map applied to the UTF-8 buffer: ASCII whitespace (as str.split sees it) -> space,
# A-Z -> a-z (NFKC + casefold on ASCII). Non-ASCII texts arrive normalised, so it is a no-op there.
_BYTE_MAP = np.arange(256, dtype=np.uint8)
_BYTE_MAP[[9, 10, 11, 12, 13, 28, 29, 30, 31]] = 32
_BYTE_MAP[65:91] += 32


def _seed_salt(seed: int) -> np.uint64:
    return mix64(np.array([(seed * 0x2545F4914F6CDD1D + 0x1234567) % 2**64], dtype=U64))[0]


def prepare(text: str) -> str:
    """Pre-normalisation: ``normalize`` less what the kernel does after it on the UTF-8 bytes
    (A-Z to a-z, whitespace runs to one space)."""
    if text.isascii():
        return text.strip() if text[:1].isspace() or text[-1:].isspace() else text
    if not unicodedata.is_normalized("NFKC", text):  # the check is ~7x faster than the work
        text = unicodedata.normalize("NFKC", text)
    return text.casefold().strip()  # the kernel reads the rarer whitespace left as a space




def batch_inputs(pre: list[str], cfg: DedupConfig) -> tuple:
    """The kernel's arguments for pre-normalised texts (``prepare``): their UTF-8 bytes and
    offsets, (word n, character n, unspaced ratio), (punctuation, digits), the seed's salt and
    the tables (byte map, character classes, powers of the base and of its inverse)."""
    buf, off = _joined([t.encode("utf-8", "surrogatepass") for t in pre])
    pw, ipw = _power_tables(int(np.diff(off).max(initial=0)) + 2)
    return (buf, off, (cfg.ngram, cfg.char_ngram, float(cfg.unspaced_ratio)),
            (bool(cfg.normalize_punctuation), bool(cfg.normalize_digits)), _seed_salt(cfg.seed),
            (_BYTE_MAP, char_classes(), pw, ipw))


def _joined(parts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    off = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)), out=off[1:])
    return np.frombuffer(b"".join(parts), dtype=np.uint8), off


def shingle_hashes(pre: list[str], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash per shingle, text index per shingle, exact key per text) of pre-normalised texts
    (``prepare``)."""
    if not pre:
        return np.zeros(0, U64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return shingle_hashes_batch(*batch_inputs(pre, cfg))
