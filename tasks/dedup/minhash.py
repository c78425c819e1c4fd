"""Deduplication: exact + MinHash/LSH near-duplicates, and the keep rule.

Everything here is pure numpy on in-memory data: no services, no Prefect. Flows wrap these
functions in tasks (``fingerprint`` per shard, ``cluster``/``deduplicate`` once on the driver).

Pipeline
--------
1. *Normalise* (``normalize``): NFKC, casefold, whitespace runs collapsed to one space. For
   near-duplicate shingles only (``normalize_punctuation``, on by default), punctuation is then
   deleted and every run of digits read as ``0`` (``simplify``), as datatrove does before
   MinHash: "how a bridge works." and "how a bridge works!" shingle alike. Exact keys (and so
   prompt ids) keep the punctuation.
2. *Shingle*: word n-grams (``ngram``) for spaced text; character n-grams (``char_ngram``) for
   text written mostly in scripts without spaces (Han, kana, Thai, Lao, Khmer, Myanmar; see
   ``is_unspaced``). A text shorter than n gives one shingle: the whole text.
3. *Fingerprint* (``fingerprint``): one 64-bit hash per shingle, computed for the whole batch at
   once with polynomial prefix hashes over the UTF-8 bytes, then a MinHash signature of
   ``num_perm`` 32-bit values by one-permutation hashing (Li, Owen & Zhang 2012) with optimal
   densification (Shrivastava 2017): each shingle hash picks one bin and the bin keeps its
   minimum; empty bins copy a filled bin chosen by a fixed, text-independent probe sequence. Two
   signatures agree in a bin with probability equal to the Jaccard similarity of the shingle
   sets, as with ``num_perm`` independent permutations, at the cost of one hash per shingle
   instead of ``num_perm``. The exact key (a 63-bit hash of the normalised text, punctuation
   kept) comes out of the same pass. Fingerprints of shards concatenate (``Fingerprints.concat``): a shard's result
   does not depend on the other shards.
4. *Cluster* (``cluster``): rows with the same exact key are merged; one representative per
   exact group goes through LSH banding (``lsh_params``: b bands of r rows chosen for the
   threshold, biased toward recall); a pair sharing a band bucket is accepted when its
   Jaccard estimate (share of equal signature values) clears ``threshold + verify_margin``,
   and, within ``verify_margin`` of the threshold, by its exact Jaccard when the texts are
   given (``similar_pairs``); accepted pairs are merged (connected components). A cluster's id is the smallest content key (hash of
   the normalised text) among its members, so it depends on the set of rows, not their order.
5. *Keep rule* (``deduplicate``): in each cluster keep the ground-truth row, then the latest
   ``updated_at``, then the longest completion, then the lowest row index.

The train/eval split by cluster is in ``split.py``.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

__all__ = [
    "DedupConfig",
    "DedupResult",
    "Fingerprints",
    "candidate_pairs",
    "cluster",
    "dedup_text",
    "deduplicate",
    "exact_jaccard",
    "fingerprint",
    "is_unspaced",
    "lsh_params",
    "normalize",
    "shingles",
    "signatures",
    "similar_pairs",
    "simplify",
]

U64 = np.uint64
_EMPTY = np.uint32(0xFFFFFFFF)  # an empty OPH bin; real values are capped one below


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


# -- normalisation and what is compared ---------------------------------------------------------


def normalize(text: str) -> str:
    """NFKC, casefold, whitespace runs collapsed to one space, ends stripped.

    Also what ``tasks.prompts.prompt_id`` hashes (as ``tasks.prompts.normalise``).
    """
    if text.isascii():  # NFKC is the identity and casefold is lower on ASCII
        return " ".join(text.lower().split())
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


_DIGITS = re.compile(r"\d+")
_ASCII_PUNCT_DELETE = str.maketrans("", "", string.punctuation)
_CLASS_LIMIT = 0x20000  # code points from here on are kept as they are


@lru_cache(maxsize=1)
def _char_classes() -> np.ndarray:
    """uint8 per code point below ``_CLASS_LIMIT`` (and one more, 0, for all above): 1 for
    punctuation (``string.punctuation`` and Unicode categories P*), 2 for digits (Nd)."""
    cls = np.zeros(_CLASS_LIMIT + 1, dtype=np.uint8)
    cls[np.frombuffer(string.punctuation.encode(), dtype=np.uint8)] = 1
    cls[48:58] = 2
    for c in range(0x80, _CLASS_LIMIT):
        cat = unicodedata.category(chr(c))
        if cat[0] == "P":
            cls[c] = 1
        elif cat == "Nd":
            cls[c] = 2
    return cls


def _unicode_simplify(texts: list[str], punctuation: bool = True, digits: bool = True) -> list[str]:
    """Punctuation deleted and every digit made ``0`` (runs are not collapsed), vectorised over
    the code points of all ``texts`` at once."""
    if not texts:
        return []
    cps = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    cls = _char_classes()[np.minimum(cps, _CLASS_LIMIT)]
    out = np.where(cls == 2, np.uint32(48), cps).astype("<u4") if digits else cps
    keep = cls != 1 if punctuation else np.ones(len(cps), dtype=bool)
    ck = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(keep, out=ck[1:])
    ends = np.cumsum([len(t) for t in texts])
    bounds = ck[ends]
    joined = out[keep].tobytes().decode("utf-32-le", "surrogatepass")
    return [joined[i:j] for i, j in zip(np.concatenate(([0], bounds[:-1])), bounds, strict=True)]


def simplify(norm: str, punctuation: bool = True, digits: bool = True) -> str:
    """What near-duplicate shingles see of a normalised text: punctuation deleted
    (``string.punctuation`` and Unicode P*, as datatrove does; ``normalize_punctuation``), each
    run of digits in any script replaced by ``0`` (``normalize_digits``), whitespace runs
    collapsed, ends stripped."""
    if norm.isascii():
        text = norm.translate(_ASCII_PUNCT_DELETE) if punctuation else norm
    else:
        text = _unicode_simplify([norm], punctuation, digits)[0]
    return " ".join((_DIGITS.sub("0", text) if digits else text).split())


def dedup_text(prompt: str, response: str, cfg: DedupConfig) -> str:
    """The text compared for a row: the prompt, or prompt and response separated by a newline."""
    if cfg.on == "prompt":
        return prompt or ""
    return f"{prompt or ''}\n{response or ''}"


# Scripts conventionally written without spaces between words.
_UNSPACED = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]"
)


_ASCII_WS = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
# The only whitespace left after NFKC + casefold that is not ASCII (checked over all of Unicode).
_RARE_WS = re.compile("[\x85\u1680\u2028\u2029]")


def is_unspaced(text: str, cfg: DedupConfig | None = None) -> bool:
    """Whether ``text`` (normalised) is shingled by characters rather than words."""
    if text.isascii():
        return False
    ratio = (cfg or DedupConfig()).unspaced_ratio
    letters = len(text) - sum(map(text.count, _ASCII_WS))
    return letters > 0 and len(_UNSPACED.findall(text)) >= ratio * letters


def shingles(text: str, cfg: DedupConfig) -> set[str]:
    """The shingle set of one text, as strings: the reference definition.

    ``fingerprint`` hashes exactly these shingles (checked by the tests); the benchmark feeds
    them to datasketch and rensa and computes exact Jaccard from them.
    """
    norm = normalize(text)
    unspaced = is_unspaced(norm, cfg)  # decided before ``simplify``
    if cfg.normalize_punctuation or cfg.normalize_digits:
        norm = simplify(norm, cfg.normalize_punctuation, cfg.normalize_digits)
    if not norm:
        return set()
    if unspaced:
        n, toks, sep = cfg.char_ngram, list(norm), ""
    else:
        n, toks, sep = cfg.ngram, norm.split(" "), " "
    if len(toks) <= n:
        return {norm}
    return {sep.join(toks[i : i + n]) for i in range(len(toks) - n + 1)}


# -- hashing primitives -------------------------------------------------------------------------

_BASE = U64(0x9E3779B97F4A7C15 | 1)  # odd: invertible mod 2**64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on a uint64 array (wraps mod 2**64)."""
    x ^= x >> U64(30)
    x *= U64(0xBF58476D1CE4E5B9)
    x ^= x >> U64(27)
    x *= U64(0x94D049BB133111EB)
    x ^= x >> U64(31)
    return x


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


@lru_cache(maxsize=16)
def _probes(num_perm: int, seed: int) -> np.ndarray:
    """(num_perm, num_perm): row j is the fixed order in which empty bin j looks for a donor."""
    rng = np.random.default_rng([seed, num_perm, 0x0DE5])
    return np.stack([rng.permutation(num_perm) for _ in range(num_perm)]).T.copy()  # [t, j]


def _seed_salt(seed: int) -> np.uint64:
    return _mix(np.array([(seed * 0x2545F4914F6CDD1D + 0x1234567) % 2**64], dtype=U64))[0]


# -- fingerprints -------------------------------------------------------------------------------


@dataclass
class Fingerprints:
    """Per-row MinHash signatures and exact keys; concatenate shard results with ``concat``."""

    sigs: np.ndarray  # (n, num_perm) uint32; all 0xFFFFFFFF for an empty text
    keys: np.ndarray  # (n,) int64 hash of the normalised text (>= 0)

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def concat(parts: Sequence[Fingerprints]) -> Fingerprints:
        parts = list(parts)
        if not parts:
            raise ValueError("no fingerprints to concatenate")
        return Fingerprints(
            np.concatenate([p.sigs for p in parts]), np.concatenate([p.keys for p in parts])
        )


def _prepare(text: str) -> str:
    """Pre-normalisation: ``normalize`` less what numpy does after it on the UTF-8 bytes
    (A-Z to a-z, ASCII whitespace runs to one space)."""
    if text.isascii():
        return text.strip() if text[:1].isspace() or text[-1:].isspace() else text
    text = unicodedata.normalize("NFKC", text).casefold()
    if _RARE_WS.search(text):
        return " ".join(text.split())
    return text.strip()


def fingerprint(
    texts: Sequence[str], cfg: DedupConfig, *, chunk_bytes: int = 1 << 20
) -> Fingerprints:
    """Signatures and exact keys of ``texts`` (raw, normalised here). Pure; run it per shard."""
    pre = [_prepare(t) for t in texts]
    sigs = np.empty((len(pre), cfg.num_perm), dtype=np.uint32)
    keys = np.empty(len(pre), dtype=np.int64)
    start, size = 0, 0
    for i, t in enumerate(pre):  # batches of about chunk_bytes keep the arrays cache-friendly
        size += len(t)
        if size >= chunk_bytes or i == len(pre) - 1:
            sigs[start : i + 1], keys[start : i + 1] = _fingerprint_batch(pre[start : i + 1], cfg)
            start, size = i + 1, 0
    return Fingerprints(sigs, keys)


def signatures(texts: Sequence[str], cfg: DedupConfig) -> np.ndarray:
    """(n, num_perm) uint32 MinHash signatures of ``texts``. Pure; shards concatenate."""
    return fingerprint(texts, cfg).sigs


def _fingerprint_batch(pre: list[str], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    sh, sh_doc, keys = _shingle_hashes(pre, cfg)
    n_docs, k = len(pre), cfg.num_perm
    with np.errstate(over="ignore"):
        # One-permutation hashing: the high half picks the bin, the low half is the value
        # (31 bits, so it never equals the empty-bin marker).
        cell = ((sh >> U64(32)) * U64(k)) >> U64(32)
    vals = sh.view(np.uint32)[::2] if sh.dtype.byteorder != ">" else sh.view(np.uint32)[1::2]
    vals = vals >> np.uint32(1)
    cell = cell.view(np.int64)
    cell += sh_doc * k
    sig = np.full(n_docs * k, _EMPTY, dtype=np.uint32)
    np.minimum.at(sig, cell, vals)
    sig = sig.reshape(n_docs, k)
    _densify(sig, cfg)
    return sig, keys


def _shingle_hashes(pre: list[str], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash per shingle, text index per shingle, exact key per text) of pre-normalised texts."""
    n_docs = len(pre)
    enc = [t.encode("utf-8", "surrogatepass") for t in pre]
    lens = np.fromiter(map(len, enc), dtype=np.int64, count=n_docs)
    raw = _BYTE_MAP[np.frombuffer(b"".join(enc), dtype=np.uint8)]
    nonempty = lens > 0

    # Collapse whitespace runs to one space (texts are stripped, so runs are interior):
    # the kept bytes are exactly the normalised texts, concatenated.
    keep = raw != 32
    keep[:-1] |= keep[1:]
    c = raw[keep]
    m = len(c)
    # dropped bytes (extra whitespace) are few: count them per text
    dropped = np.flatnonzero(~keep)
    clens = (
        lens
        - np.bincount(np.searchsorted(np.cumsum(lens), dropped, side="right"), minlength=n_docs)[
            :n_docs
        ]
    )
    ends = np.cumsum(clens)
    starts = ends - clens

    # Polynomial prefix hashes: hash(c[s:e]) = (H[e] - H[s]) * BASE**-s  (mod 2**64).
    h = _prefix_hashes(c)
    ipw = _power_tables(m + 1)[1]
    with np.errstate(over="ignore"):
        whole = h[ends] - h[starts]
        # Exact keys: hash of each whole normalised text (its length separates "" from others).
        full = whole * ipw[starts] + clens.astype(U64) * U64(0x632BE59BD9B4E019)
    keys = (_mix(full) >> U64(1)).astype(np.int64)

    punct, digits = cfg.normalize_punctuation, cfg.normalize_digits
    if punct or digits:  # shingles see the simplified text; the keys above do not
        uni = [i for i, t in enumerate(pre) if not t.isascii()]
        if not uni:
            buf, blens = raw, lens
        else:  # non-ASCII texts: punctuation and digits done here, the rest by the bytes pass
            enc2 = list(enc)
            for i, t in zip(uni, _unicode_simplify([pre[i] for i in uni], punct, digits),
                            strict=True):
                enc2[i] = t.encode("utf-8", "surrogatepass")
            blens = np.fromiter(map(len, enc2), dtype=np.int64, count=n_docs)
            buf = _BYTE_MAP[np.frombuffer(b"".join(enc2), dtype=np.uint8)]
        c, clens = _simplify_bytes(buf, blens, punct, digits)
        m = len(c)
        ends = np.cumsum(clens)
        starts = ends - clens
        nonempty = clens > 0
        h = _prefix_hashes(c)
        ipw = _power_tables(m + 1)[1]

    # Token boundaries: words (between spaces) or, for unspaced texts, characters.
    char_mode = np.fromiter(
        (not t.isascii() and is_unspaced(t, cfg) for t in pre), dtype=bool, count=n_docs
    )
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
    tok_lo = np.searchsorted(t_start, starts)
    tok_hi = np.searchsorted(t_start, ends)
    n_tok = tok_hi - tok_lo
    n_gram = np.where(char_mode, cfg.char_ngram, cfg.ngram).astype(np.int64)

    # Shingle i of a text spans tokens i .. i+n-1; a text with fewer than n tokens has one.
    n_sh = np.where(n_tok >= n_gram, n_tok - n_gram + 1, np.minimum(n_tok, 1))
    sh_doc = np.repeat(np.arange(n_docs), n_sh)
    first = np.arange(len(sh_doc)) + np.repeat(tok_lo - (np.cumsum(n_sh) - n_sh), n_sh)
    last = np.minimum(first + np.repeat(n_gram - 1, n_sh), np.repeat(tok_hi - 1, n_sh))
    s_b = t_start[first]
    with np.errstate(over="ignore"):
        sh = h[t_end[last]]
        sh -= h[s_b]
        sh *= ipw[s_b]
        sh ^= _seed_salt(cfg.seed)
        sh *= U64(0xBF58476D1CE4E5B9)
        sh ^= sh >> U64(29)
    return sh, sh_doc, keys


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
    collapsed, ends stripped. Non-ASCII punctuation and digits were handled by ``_unicode_simplify``."""
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


def _densify(sig: np.ndarray, cfg: DedupConfig) -> None:
    """Fill empty bins in place from the first filled bin on each bin's fixed probe sequence."""
    n, k = sig.shape
    flat = sig.reshape(-1)
    filled = flat != _EMPTY
    empty = np.flatnonzero(~filled)
    if not len(empty):
        return
    row_start = empty - empty % k
    has_any = filled.reshape(n, k).any(axis=1)
    keep = has_any[empty // k]
    empty, row_start = empty[keep], row_start[keep]
    probes = _probes(k, cfg.seed)
    col = empty - row_start
    donor = np.empty(len(empty), dtype=np.int64)
    todo = np.arange(len(empty))
    for t in range(k):
        cand = row_start[todo] + probes[t, col[todo]]
        ok = filled[cand]
        donor[todo[ok]] = cand[ok]
        todo = todo[~ok]
        if not len(todo):
            break
    flat[empty] = flat[donor]


# -- LSH and clustering -------------------------------------------------------------------------


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fn_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows) minimising weighted false-positive and false-negative area of the S-curve.

    Candidates are verified afterwards, so misses weigh more than extra candidates.
    """
    xs = np.linspace(0.0, 1.0, 2001)
    best, best_cost = (1, num_perm), np.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - xs**r) ** b
            fp = np.trapezoid(np.where(xs < threshold, p, 0.0), xs)
            fn = np.trapezoid(np.where(xs >= threshold, 1.0 - p, 0.0), xs)
            cost = (1.0 - fn_weight) * fp + fn_weight * fn
            if cost < best_cost:
                best, best_cost = (b, r), cost
    return best


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph: the smallest node index per node."""
    label = np.arange(n, dtype=np.int64)
    if not len(a):
        return label
    while True:
        la, lb = label[a], label[b]
        low = np.minimum(la, lb)
        new = label.copy()
        np.minimum.at(new, la, low)
        np.minimum.at(new, lb, low)
        new = new[new]
        while True:  # pointer jumping
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, label):
            return label
        label = new


def _content_keys(exact_keys: Sequence[Any] | np.ndarray) -> np.ndarray:
    arr = np.asarray(exact_keys)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    out = np.empty(len(arr), dtype=np.int64)
    for i, key in enumerate(arr):
        digest = hashlib.blake2b(str(key).encode("utf-8", "surrogatepass"), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") >> 1
    return out


def candidate_pairs(
    sigs: np.ndarray, cfg: DedupConfig, order_keys: np.ndarray | None = None, window: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (a < b) sharing at least one LSH band bucket.

    Within a bucket (sorted by ``order_keys``, for order independence) each member is paired
    with the next ``window`` members and with the bucket's first member, so a huge bucket costs
    O(size * window), not O(size**2).
    """
    n, k = sigs.shape
    bands, r = lsh_params(cfg.threshold, k)
    live = np.flatnonzero(sigs[:, 0] != _EMPTY) if n else np.zeros(0, np.int64)
    if len(live) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order_keys = np.arange(n) if order_keys is None else order_keys
    mult = _mix(np.arange(1, r + 1, dtype=U64) * U64(0x9E3779B97F4A7C15))
    out = []
    for band in range(bands):
        block = sigs[live, band * r : (band + 1) * r].astype(U64)
        with np.errstate(over="ignore"):
            bh = _mix((block * mult).sum(axis=1, dtype=U64) + U64(band))
        order = np.lexsort((order_keys[live], bh))
        hs, idx = bh[order], live[order]
        same = hs[1:] == hs[:-1]
        if not same.any():
            continue
        new_bucket = np.concatenate(([True], ~same))
        bucket_first = np.maximum.accumulate(np.where(new_bucket, np.arange(len(hs)), 0))
        in_dup = np.flatnonzero(np.concatenate((same, [False])) | np.concatenate(([False], same)))
        heads = bucket_first[in_dup]
        nonhead = in_dup[in_dup != heads]
        out.append(np.stack([idx[bucket_first[nonhead]], idx[nonhead]]))
        pos = np.flatnonzero(same)
        for d in range(1, window + 1):
            if d > 1:
                pos = pos[pos + d < len(hs)]
                pos = pos[bucket_first[pos + d] == bucket_first[pos]]
            if not len(pos):
                break
            out.append(np.stack([idx[pos], idx[pos + d]]))
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.concatenate(out, axis=1)
    a, b = np.minimum(pairs[0], pairs[1]), np.maximum(pairs[0], pairs[1])
    code = np.unique(a * np.int64(n) + b)
    return code // n, code % n


def exact_jaccard(
    texts: Sequence[str], a: np.ndarray, b: np.ndarray, cfg: DedupConfig
) -> np.ndarray:
    """Exact Jaccard of the shingle sets of ``texts[a[i]]`` and ``texts[b[i]]`` (vectorised).

    Shingles are compared by 40 bits of their hash: a false match has odds of about 1e-12.
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    out = np.ones(len(a), dtype=np.float64)
    if not len(a):
        return out
    docs, local = np.unique(np.concatenate([a, b]), return_inverse=True)
    la, lb = local[: len(a)], local[len(a) :]
    parts, start, size = [], 0, 0
    pre = [_prepare(texts[i]) for i in docs]
    for i, t in enumerate(pre):  # batches of about 1 MB, as in fingerprint
        size += len(t)
        if size >= 1 << 20 or i == len(pre) - 1:
            sh, sh_doc, _ = _shingle_hashes(pre[start : i + 1], cfg)
            parts.append((sh, sh_doc + start))
            start, size = i + 1, 0
    sh = np.concatenate([p[0] for p in parts])
    sh_doc = np.concatenate([p[1] for p in parts])
    sets = np.unique((sh_doc.astype(U64) << U64(40)) | (sh >> U64(24)))  # sorted, per text
    set_doc = (sets >> U64(40)).astype(np.int64)
    lo = np.searchsorted(set_doc, np.arange(len(docs)))
    size = np.searchsorted(set_doc, np.arange(len(docs)), side="right") - lo
    low40 = sets & U64((1 << 40) - 1)
    # The smaller set of each pair is looked up in the larger one. Both sides, keyed by
    # (pair << 40 | shingle), come out sorted without sorting: pairs ascend, sets are sorted.
    small, large = np.where(size[la] <= size[lb], la, lb), np.where(size[la] <= size[lb], lb, la)
    step = 1 << 16
    for i in range(0, len(a), step):
        ps, pl = small[i : i + step], large[i : i + step]
        ns, nl = size[ps], size[pl]
        pair_ids = np.arange(len(ps), dtype=U64)

        def keyed(p, n, pair_ids=pair_ids):
            idx = np.repeat(lo[p] - np.cumsum(n) + n, n) + np.arange(n.sum())
            return (np.repeat(pair_ids, n) << U64(40)) | low40[idx]

        qs, ql = keyed(ps, ns), keyed(pl, nl)
        pos = np.minimum(np.searchsorted(ql, qs), max(len(ql) - 1, 0))
        hit = ql[pos] == qs if len(ql) else np.zeros(len(qs), dtype=bool)
        inter = np.bincount((qs[hit] >> U64(40)).astype(np.int64), minlength=len(ps))
        union = ns + nl - inter
        out[i : i + step] = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return out


def similar_pairs(
    sigs: np.ndarray,
    cfg: DedupConfig,
    order_keys: np.ndarray | None = None,
    texts: Sequence[str] | None = None,
    max_rounds: int = 8,
    ignore_below: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs accepted as near-duplicates, and their (estimated or exact) Jaccard.

    A pair's Jaccard is estimated by the share of equal signature values. Without ``texts``
    a pair is accepted when the estimate reaches the threshold. With ``texts``, pairs whose
    estimate lies within ``cfg.verify_margin`` of the threshold are decided by their exact Jaccard
    instead (the estimate's standard deviation is about 0.035 at 128 values, and LSH selects
    pairs whose estimate came out high, so near the threshold it errs both ways) -- but only
    those that would join two groups not already joined by confident pairs (estimate >=
    threshold + margin): the others cannot change any cluster, so they are left out.
    Groups are joined in rounds, one pair per two groups each; after ``max_rounds`` the
    remaining pairs are decided by their estimate. Pairs of two rows below ``ignore_below``
    are never considered (the rows of a parent version: already deduplicated, see
    ``stable.stable_dedup``).
    """
    margin = cfg.verify_margin
    a, b = candidate_pairs(sigs, cfg, order_keys)
    if ignore_below:
        new = b >= ignore_below  # a < b: a pair has a new row when b is new
        a, b = a[new], b[new]
    est = np.empty(len(a), dtype=np.float64)
    step = max(1, (1 << 22) // sigs.shape[1])
    for i in range(0, len(a), step):
        est[i : i + step] = (sigs[a[i : i + step]] == sigs[b[i : i + step]]).mean(axis=1)
    if texts is None or margin <= 0:
        ok = est >= cfg.threshold - 1e-9
        return a[ok], b[ok], est[ok]
    ok = est >= cfg.threshold + margin
    border = np.flatnonzero(np.abs(est - cfg.threshold) < margin)
    pending = border[np.argsort(-est[border], kind="stable")]  # likeliest first
    n = len(sigs)
    for _ in range(max_rounds):
        comp = _components(n, a[ok], b[ok])
        ca, cb = comp[a[pending]], comp[b[pending]]
        apart = ca != cb
        pending, ca, cb = pending[apart], ca[apart], cb[apart]
        if not len(pending):
            break
        # one pair per two groups per round: once it joins them, the others are moot
        _, first = np.unique(np.minimum(ca, cb) * n + np.maximum(ca, cb), return_index=True)
        checked = np.zeros(len(pending), dtype=bool)
        checked[first] = True
        batch = pending[checked]
        est[batch] = exact_jaccard(texts, a[batch], b[batch], cfg)
        ok[batch] = est[batch] >= cfg.threshold - 1e-9
        pending = pending[~checked]  # still in order
    else:  # rounds exhausted: the rest is decided by the estimate
        ok[pending] = est[pending] >= cfg.threshold - 1e-9
    return a[ok], b[ok], est[ok]


def cluster(
    sigs: np.ndarray,
    cfg: DedupConfig,
    exact_keys: Sequence[Any] | np.ndarray | None = None,
    texts: Sequence[str] | None = None,
) -> np.ndarray:
    """int64 cluster id per row: the smallest content key among the cluster's members.

    ``exact_keys`` (strings or ints, e.g. ``Fingerprints.keys``) merge identical texts first
    and serve as content keys; without them a row's content key is a hash of its signature.
    Ids depend on the set of rows, not their order. ``cfg.near=False`` keeps exact groups only;
    ``cfg.exact=False`` ignores ``exact_keys`` for merging (identical texts still share a
    signature and merge as near-duplicates when ``near`` is on). With ``texts`` (the compared
    texts, row-aligned), pairs near the threshold are checked by exact Jaccard (``similar_pairs``).
    """
    sigs = np.asarray(sigs)
    n = len(sigs)
    if exact_keys is None:
        ckey = _content_keys(
            [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in sigs]
        )
    else:
        if len(exact_keys) != n:
            raise ValueError(f"exact_keys has {len(exact_keys)} entries for {n} signatures")
        ckey = _content_keys(exact_keys)
    if cfg.exact and exact_keys is not None:
        _, rep_of_row = np.unique(ckey, return_inverse=True)
        rep_of_row = rep_of_row.ravel()
        first = np.full(rep_of_row.max(initial=-1) + 1, n, dtype=np.int64)
        np.minimum.at(first, rep_of_row, np.arange(n))
        reps = first
    else:
        rep_of_row = np.arange(n)
        reps = np.arange(n)
    comp = np.arange(len(reps), dtype=np.int64)
    if cfg.near and len(reps) > 1:
        rep_texts = None if texts is None else [texts[i] for i in reps]
        a, b, _ = similar_pairs(sigs[reps], cfg, ckey[reps], rep_texts)
        comp = _components(len(reps), a, b)
    comp_of_row = comp[rep_of_row]
    cid = np.full(len(reps), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(cid, comp_of_row, ckey)
    return cid[comp_of_row]


# -- keep rule and report -----------------------------------------------------------------------


@dataclass
class DedupResult:
    """Which rows survive, their clusters, and what was dropped and why."""

    keep: np.ndarray  # bool per row
    cluster_id: np.ndarray  # int64 per row
    dropped: dict[str, int] = field(default_factory=dict)  # exact_duplicate, near_duplicate
    clusters_removed: int = 0  # clusters that lost at least one row
    examples: list[dict] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    def summary(self) -> dict:
        """JSON-ready counts (no row text)."""
        return {
            "rows": len(self.keep),
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "clusters_removed": self.clusters_removed,
        }


def _timestamp(value: Any) -> float:
    if value is None or value == "":
        return float("-inf")
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value))
        except ValueError:
            return float("-inf")
    if dt.tzinfo is None:  # naive times are taken as UTC
        return (dt - datetime(1970, 1, 1)).total_seconds()
    return dt.timestamp()


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def deduplicate(
    rows: Sequence[Mapping[str, Any]],
    cfg: DedupConfig,
    *,
    fingerprints: Fingerprints | None = None,
    executor: Executor | None = None,
    shard_rows: int = 20_000,
    max_examples: int = 5,
    example_chars: int = 200,
) -> DedupResult:
    """Exact + near dedup of ``rows`` ("prompt", "completion", "ground_truth", "updated_at").

    Keep rule per cluster: ground truth first, then the latest ``updated_at`` (ISO 8601;
    missing sorts oldest), then the longest completion, then the lowest row index.
    ``fingerprints`` (e.g. computed per shard by mapped tasks and concatenated) skip the
    hashing; otherwise ``executor`` (a process pool) fingerprints shards of ``shard_rows``.
    """
    n = len(rows)
    texts = [dedup_text(r.get("prompt") or "", r.get("completion") or "", cfg) for r in rows]
    if fingerprints is None:
        if executor is not None and n > shard_rows:
            shards = [texts[i : i + shard_rows] for i in range(0, n, shard_rows)]
            parts = list(executor.map(fingerprint, shards, [cfg] * len(shards)))
            fingerprints = Fingerprints.concat(parts)
        else:
            fingerprints = fingerprint(texts, cfg)
    if len(fingerprints) != n:
        raise ValueError(f"fingerprints cover {len(fingerprints)} rows, not {n}")
    if not cfg.exact and not cfg.near:  # nothing dropped; identical texts still share a cluster
        return DedupResult(
            np.ones(n, dtype=bool),
            fingerprints.keys.copy(),
            {"exact_duplicate": 0, "near_duplicate": 0},
        )
    cid = cluster(fingerprints.sigs, cfg, fingerprints.keys, texts)

    gt = np.fromiter((bool(r.get("ground_truth")) for r in rows), dtype=bool, count=n)
    ts = np.fromiter((_timestamp(r.get("updated_at")) for r in rows), dtype=float, count=n)
    ln = np.fromiter((len(r.get("completion") or "") for r in rows), dtype=np.int64, count=n)
    # Sort by cluster, then best first; the first row of each cluster is kept.
    order = np.lexsort((np.arange(n), -ln, -ts, ~gt, cid))
    first = np.ones(n, dtype=bool)
    first[1:] = cid[order][1:] != cid[order][:-1]
    keep = np.zeros(n, dtype=bool)
    keep[order[first]] = True

    winner = np.empty(n, dtype=np.int64)  # the kept row of each row's cluster
    winner[order] = order[first][np.cumsum(first) - 1]
    exact_dup = ~keep & (fingerprints.keys == fingerprints.keys[winner])
    near_dup = ~keep & ~exact_dup
    removed_clusters = np.unique(cid[~keep])

    examples = []
    if len(removed_clusters):
        sizes = np.bincount(np.searchsorted(removed_clusters, cid[np.isin(cid, removed_clusters)]))
        # largest clusters first, ties by id: deterministic
        for j in np.lexsort((removed_clusters, -sizes))[:max_examples]:
            members = np.flatnonzero(cid == removed_clusters[j])
            kept_row = int(members[keep[members]][0])
            examples.append(
                {
                    "cluster_id": int(removed_clusters[j]),
                    "size": len(members),
                    "kept": {"row": kept_row, "text": _truncate(texts[kept_row], example_chars)},
                    "dropped": [
                        {
                            "row": int(i),
                            "reason": "exact_duplicate" if exact_dup[i] else "near_duplicate",
                            "text": _truncate(texts[i], example_chars),
                        }
                        for i in members[~keep[members]][:3]
                    ],
                }
            )
    return DedupResult(
        keep=keep,
        cluster_id=cid,
        dropped={"exact_duplicate": int(exact_dup.sum()), "near_duplicate": int(near_dup.sum())},
        clusters_removed=len(removed_clusters),
        examples=examples,
    )
