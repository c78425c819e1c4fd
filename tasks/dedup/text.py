"""What is compared: normalisation, the compared text of a row, and its shingle set.

1. *Normalise* (``normalize``): NFKC, casefold, whitespace runs collapsed to one space. For
   near-duplicate shingles only (``normalize_punctuation``, on by default), punctuation is then
   deleted and every run of digits read as ``0`` (``simplify``), as datatrove does before
   MinHash: "how a bridge works." and "how a bridge works!" shingle alike. Exact keys (and so
   prompt ids) keep the punctuation.
2. *Shingle*: word n-grams (``ngram``) for spaced text; character n-grams (``char_ngram``) for
   text written mostly in scripts without spaces (Han, kana, Thai, Lao, Khmer, Myanmar; see
   ``is_unspaced``). A text shorter than n gives one shingle: the whole text.

``shingles`` is the reference definition, on strings; ``shingling.shingle_hashes`` hashes the
same shingles for a whole batch at once.
"""

from __future__ import annotations

import re
import string
import unicodedata
from functools import lru_cache

import numpy as np

from sftflow.tasks.dedup.config import DedupConfig


def normalize(text: str) -> str:
    """NFKC, casefold, whitespace runs collapsed to one space, ends stripped.

    Also what ``tasks.ingest.prompts.prompt_id`` hashes (as ``tasks.ingest.prompts.normalise``).
    """
    if text.isascii():  # NFKC is the identity and casefold is lower on ASCII
        return " ".join(text.lower().split())
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


_DIGITS = re.compile(r"\d+")
_ASCII_PUNCT_DELETE = str.maketrans("", "", string.punctuation)
_CLASS_LIMIT = 0x20000  # code points from here on are kept as they are


@lru_cache(maxsize=1)
def char_classes() -> np.ndarray:
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


def unicode_simplify(texts: list[str], punctuation: bool = True, digits: bool = True) -> list[str]:
    """Punctuation deleted and every digit made ``0`` (runs are not collapsed), vectorised over
    the code points of all ``texts`` at once."""
    if not texts:
        return []
    cps = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    cls = char_classes()[np.minimum(cps, _CLASS_LIMIT)]
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
        text = unicode_simplify([norm], punctuation, digits)[0]
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

