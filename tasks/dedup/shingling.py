"""Shingle hashes of a batch of texts at once: one 64-bit hash per shingle, and exact keys.

The vectorised counterpart of ``text.shingles``: texts are pre-normalised one by one
(``prepare``), concatenated as UTF-8 bytes, and the rest of the normalisation (A-Z to a-z,
whitespace runs, punctuation and digits for shingles) is done by numpy on the byte buffer.
Shingles are hashed with polynomial prefix hashes over those bytes (hash of any byte range in
O(1)), salted by the seed and scrambled. The exact key of a text (a 63-bit hash of its
normalised text, punctuation kept) comes out of the same pass.
"""

from __future__ import annotations

import re
import string
import unicodedata

import numpy as np

from sftflow.tasks.dedup.config import DedupConfig
from sftflow.tasks.dedup.hashing import U64, mix64
from sftflow.tasks.dedup.text import is_unspaced, unicode_simplify

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
# Bytes ``simplify`` deletes (ASCII punctuation) and digits, as lookup tables over byte values.
_PUNCT_BYTE = np.zeros(256, dtype=bool)
_PUNCT_BYTE[np.frombuffer(string.punctuation.encode(), dtype=np.uint8)] = True
_DIGIT_BYTE = np.zeros(256, dtype=bool)
_DIGIT_BYTE[48:58] = True


def _seed_salt(seed: int) -> np.uint64:
    return mix64(np.array([(seed * 0x2545F4914F6CDD1D + 0x1234567) % 2**64], dtype=U64))[0]


# The only whitespace left after NFKC + casefold that is not ASCII (checked over all of Unicode).
_RARE_WS = re.compile("[\x85\u1680\u2028\u2029]")


def prepare(text: str) -> str:
    """Pre-normalisation: ``normalize`` less what numpy does after it on the UTF-8 bytes
    (A-Z to a-z, ASCII whitespace runs to one space)."""
    if text.isascii():
        return text.strip() if text[:1].isspace() or text[-1:].isspace() else text
    text = unicodedata.normalize("NFKC", text).casefold()
    if _RARE_WS.search(text):
        return " ".join(text.split())
    return text.strip()




def shingle_hashes(pre: list[str], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash per shingle, text index per shingle, exact key per text) of pre-normalised texts
    (``prepare``)."""
    n_docs = len(pre)
    enc = [t.encode("utf-8", "surrogatepass") for t in pre]
    lens = np.fromiter(map(len, enc), dtype=np.int64, count=n_docs)
    raw = _BYTE_MAP[np.frombuffer(b"".join(enc), dtype=np.uint8)]
    nonempty = lens > 0
    c, clens = _collapse_spaces(raw, lens)
    h = _prefix_hashes(c)
    keys = _exact_keys(h, clens)

    punct, digits = cfg.normalize_punctuation, cfg.normalize_digits
    if punct or digits:  # shingles see the simplified text; the keys above do not
        buf, blens = _unicode_simplified(pre, enc, raw, lens, punct, digits)
        c, clens = _simplify_bytes(buf, blens, punct, digits)
        nonempty = clens > 0
        h = _prefix_hashes(c)

    char_mode = np.fromiter(
        (not t.isascii() and is_unspaced(t, cfg) for t in pre), dtype=bool, count=n_docs
    )
    t_start, t_end, tok_lo, tok_hi = _token_bounds(c, clens, nonempty, char_mode)
    n_gram = np.where(char_mode, cfg.char_ngram, cfg.ngram).astype(np.int64)
    sh, sh_doc = _hash_shingles(h, t_start, t_end, tok_lo, tok_hi, n_gram, cfg.seed)
    return sh, sh_doc, keys


def _collapse_spaces(raw: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whitespace runs collapsed to one space (texts are stripped, so runs are interior): the
    kept bytes are exactly the normalised texts, concatenated; and each text's new length."""
    keep = raw != 32
    keep[:-1] |= keep[1:]
    c = raw[keep]
    # dropped bytes (extra whitespace) are few: count them per text
    dropped = np.flatnonzero(~keep)
    clens = (
        lens
        - np.bincount(np.searchsorted(np.cumsum(lens), dropped, side="right"), minlength=len(lens))[
            : len(lens)
        ]
    )
    return c, clens


def _exact_keys(h: np.ndarray, clens: np.ndarray) -> np.ndarray:
    """Exact keys: hash of each whole normalised text (its length separates "" from others),
    from the prefix hashes ``h`` of the concatenated texts."""
    ends = np.cumsum(clens)
    starts = ends - clens
    ipw = _power_tables(len(h))[1]
    with np.errstate(over="ignore"):
        whole = h[ends] - h[starts]
        full = whole * ipw[starts] + clens.astype(U64) * U64(0x632BE59BD9B4E019)
    return (mix64(full) >> U64(1)).astype(np.int64)


def _unicode_simplified(
    pre: list[str], enc: list[bytes], raw: np.ndarray, lens: np.ndarray, punct: bool, digits: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The byte buffer and lengths ``_simplify_bytes`` starts from: non-ASCII texts have their
    punctuation and digits done here (``unicode_simplify``), the rest is left to the bytes pass."""
    uni = [i for i, t in enumerate(pre) if not t.isascii()]
    if not uni:
        return raw, lens
    enc2 = list(enc)
    for i, t in zip(uni, unicode_simplify([pre[i] for i in uni], punct, digits), strict=True):
        enc2[i] = t.encode("utf-8", "surrogatepass")
    blens = np.fromiter(map(len, enc2), dtype=np.int64, count=len(pre))
    return _BYTE_MAP[np.frombuffer(b"".join(enc2), dtype=np.uint8)], blens


def _token_bounds(
    c: np.ndarray, clens: np.ndarray, nonempty: np.ndarray, char_mode: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Token boundaries: words (between spaces) or, for unspaced texts, characters.

    (first byte of each token, one past its last byte, each text's first token, one past
    its last token)."""
    m = len(c)
    ends = np.cumsum(clens)
    starts = ends - clens
    is_word = c != 32
    last_byte = ends[nonempty] - 1
    tok_start = is_word.copy()
    tok_end = is_word.copy()
    if m:
        tok_start[1:] &= ~is_word[:-1]
        tok_start[starts[nonempty]] = True  # texts never start with a space
        tok_end[:-1] &= ~is_word[1:]
        tok_end[last_byte] = True
    if char_mode.any():
        byte_char = np.repeat(char_mode, clens)
        lead = (c & 0xC0) != 0x80
        next_lead = np.ones(m, dtype=bool)
        next_lead[:-1] = lead[1:]
        next_lead[last_byte] = True
        tok_start = np.where(byte_char, lead, tok_start)
        tok_end = np.where(byte_char, next_lead, tok_end)
    t_start = np.flatnonzero(tok_start)
    t_end = np.flatnonzero(tok_end) + 1
    return t_start, t_end, np.searchsorted(t_start, starts), np.searchsorted(t_start, ends)


def _hash_shingles(
    h: np.ndarray, t_start: np.ndarray, t_end: np.ndarray, tok_lo: np.ndarray,
    tok_hi: np.ndarray, n_gram: np.ndarray, seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(hash per shingle, text index per shingle). Shingle i of a text spans tokens
    i .. i+n-1; a text with fewer than n tokens has one."""
    n_tok = tok_hi - tok_lo
    n_sh = np.where(n_tok >= n_gram, n_tok - n_gram + 1, np.minimum(n_tok, 1))
    sh_doc = np.repeat(np.arange(len(n_sh)), n_sh)
    first = np.arange(len(sh_doc)) + np.repeat(tok_lo - (np.cumsum(n_sh) - n_sh), n_sh)
    last = np.minimum(first + np.repeat(n_gram - 1, n_sh), np.repeat(tok_hi - 1, n_sh))
    s_b = t_start[first]
    ipw = _power_tables(len(h))[1]
    with np.errstate(over="ignore"):
        sh = h[t_end[last]]
        sh -= h[s_b]
        sh *= ipw[s_b]
        sh ^= _seed_salt(seed)
        sh *= U64(0xBF58476D1CE4E5B9)
        sh ^= sh >> U64(29)
    return sh, sh_doc


def _prefix_hashes(c: np.ndarray) -> np.ndarray:
    """H[i] = sum of c[j] * BASE**j for j < i (mod 2**64), with H[0] = 0."""
    m = len(c)
    pw = _power_tables(m + 1)[0]
    h = np.zeros(m + 1, dtype=U64)
    with np.errstate(over="ignore"):
        np.cumsum(c * pw[:m], out=h[1:])
    return h


def _drop(buf: np.ndarray, lens: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated texts less the bytes marked in ``drop`` (few), and each text's new length."""
    gone = np.flatnonzero(drop)
    if not len(gone):
        return buf, lens
    per_text = np.bincount(np.searchsorted(np.cumsum(lens), gone, side="right"), minlength=len(lens))
    return buf[~drop], lens - per_text[: len(lens)]


def _text_starts(lens: np.ndarray, size: int) -> np.ndarray:
    """Bool per byte of concatenated texts: the first byte of a (non-empty) text."""
    first = np.zeros(size + 1, dtype=bool)
    first[(np.cumsum(lens) - lens)[lens > 0]] = True
    return first[:size]


def _simplify_bytes(
    buf: np.ndarray, lens: np.ndarray, punctuation: bool = True, digits: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``simplify`` on concatenated texts already through ``_BYTE_MAP`` (whitespace is a space,
    A-Z lower case): ASCII punctuation deleted, digit runs to one ``0``, whitespace runs
    collapsed, ends stripped. Non-ASCII punctuation and digits were handled by ``unicode_simplify``."""
    if punctuation:
        buf, lens = _drop(buf, lens, _PUNCT_BYTE[buf])
    first = _text_starts(lens, len(buf))
    digit = _DIGIT_BYTE[buf] if digits else np.zeros(len(buf), dtype=bool)
    space = buf == 32
    # A digit after a digit, a space after a space or at a text's start, a space before the
    # next text's start (or the end).
    drop = np.empty(len(buf), dtype=bool)
    if len(buf):
        drop[0] = space[0]
        drop[1:] = (digit[1:] & digit[:-1]) | (space[1:] & space[:-1])
        drop &= ~first
        drop |= space & first
        drop[:-1] |= space[:-1] & first[1:]
        drop[-1] |= space[-1]
    if digit.any():
        buf = np.where(digit, np.uint8(48), buf)
    buf, lens = _drop(buf, lens, drop)
    last = (np.cumsum(lens) - 1)[lens > 0]  # a run of spaces ending a text leaves its first
    trailing = np.zeros(len(buf), dtype=bool)
    trailing[last[buf[last] == 32]] = True
    return _drop(buf, lens, trailing)

