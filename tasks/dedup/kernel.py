"""The compiled loops of dedup: one pass per text over a batch's bytes (exact keys, shingle
hashes, MinHash signatures), the Jaccard estimate of pairs, connected components.

numba-compiled (``cache=True``: compiled once per machine, kept beside this file; ``make
install`` runs ``minhash.compile_kernels``), one thread. For each text, one pass over its UTF-8
bytes (``_views``) gives:

1. the exact key: the polynomial hash of the text with whitespace runs collapsed, its length
   mixed in, ``mix64``, 63 bits;
2. the near-duplicate view: punctuation deleted and digits read as ``0`` by code point (the
   class table of ``text.char_classes``, as ``text.unicode_simplify`` does), digit and
   whitespace runs shrunk to one, ends stripped; and the count that decides word or character
   shingles (``text.is_unspaced``);

then ``_shingles`` finds its tokens (words, or UTF-8 characters for unspaced scripts) and
hashes each shingle of ``n`` tokens as ``(H[end] - H[start]) * BASE**-start`` over the view's
prefix hashes, salted and scrambled (a text of fewer than ``n`` tokens has one shingle), and
``fingerprint_batch`` makes the one-permutation signature with optimal densification.

The arithmetic is the vectorised numpy version's that this replaced (wrapping mod 2**64, the
same constants), so keys, signatures and version ids did not move: tests compare it with a
reference written out from the shingle strings (``tests/tasks/dedup/test_minhash.py``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_U = np.uint64
_M1 = _U(0xBF58476D1CE4E5B9)
_M2 = _U(0x94D049BB133111EB)
_LEN = _U(0x632BE59BD9B4E019)
_EMPTY = np.uint32(0xFFFFFFFF)


@njit(cache=True, inline="always")
def _mix64(x):
    x ^= x >> _U(30)
    x *= _M1
    x ^= x >> _U(27)
    x *= _M2
    x ^= x >> _U(31)
    return x


@njit(cache=True, inline="always")
def _decode(src, i):
    """(code point, byte length) of the UTF-8 sequence at src[i] (Python's encoder wrote it)."""
    b = np.int64(src[i])
    if b < 0x80:
        return b, 1
    if b < 0xE0:
        return ((b & 0x1F) << 6) | (np.int64(src[i + 1]) & 0x3F), 2
    if b < 0xF0:
        return (((b & 0x0F) << 12) | ((np.int64(src[i + 1]) & 0x3F) << 6)
                | (np.int64(src[i + 2]) & 0x3F)), 3
    return (((b & 0x07) << 18) | ((np.int64(src[i + 1]) & 0x3F) << 12)
            | ((np.int64(src[i + 2]) & 0x3F) << 6) | (np.int64(src[i + 3]) & 0x3F)), 4


@njit(cache=True, inline="always")
def _unspaced_cp(cp):
    """A code point of a script written without spaces (``text._UNSPACED``)."""
    return ((0x0E00 <= cp <= 0x0EFF) or (0x1000 <= cp <= 0x109F) or (0x1780 <= cp <= 0x17FF)
            or (0x3040 <= cp <= 0x30FF) or (0x31F0 <= cp <= 0x31FF) or (0x3400 <= cp <= 0x4DBF)
            or (0x4E00 <= cp <= 0x9FFF) or (0xF900 <= cp <= 0xFAFF)
            or (0x20000 <= cp <= 0x3134F))


@njit(cache=True, inline="always")
def _put(c, h, m, hv, b, pw):
    """Byte ``b`` appended to the view c[:m] whose prefix hash is ``hv``: (m + 1, new hash)."""
    c[m] = b
    hv += _U(b) * pw[m]
    h[m + 1] = hv
    return m + 1, hv


@njit(cache=True, inline="always")
def _kept(b, as_digit, state):
    """Whether the simplified view keeps byte ``b``: runs of spaces and of digits (of the
    bytes punctuation left) shrink to their first, a leading space goes. ``state``: (previous
    was a digit, previous was a space, first byte), as 0/1; returns (keep, new state)."""
    is_s = np.int64(b == 32)
    prev_d, prev_s, first = state
    drop = (is_s & (first | prev_s)) | (as_digit & prev_d & (1 - first))
    return drop == 0, (as_digit, is_s, np.int64(0))


@njit(cache=True)
def _views(src, lo, hi, bmap, classes, punct, digits, ratio, pw, c, h):
    """One pass over src[lo:hi]: (exact key, length of the shingles' view written to ``c``, with
    its prefix hashes in ``h``, whether it is shingled by characters).

    The key's view: bytes mapped (whitespace to a space, A-Z to a-z), whitespace runs collapsed.
    The shingles' view, with ``punct`` or ``digits``: punctuation (class 1: ``string.punctuation``
    and Unicode P*) deleted and every digit (class 2: Nd) read as ``0``, by code point, as
    ``text.unicode_simplify`` does; then digit runs and whitespace runs shrink to their first,
    and the ends are stripped. Without either it is the key's view. ``text.is_unspaced`` counts
    the code points of the text as given."""
    simplify = punct or digits
    limit = len(classes) - 1
    key, k_len, k_space = _U(0), 0, False
    m, hv, state = 0, _U(0), (np.int64(0), np.int64(0), np.int64(1))
    letters, unspaced, wide = 0, 0, False
    i = lo
    while i < hi:
        b0, size, cp = src[i], 1, np.int64(src[i])
        if b0 >= 0x80:
            cp, size = _decode(src, i)
            if cp == 0x85 or cp == 0x1680 or cp == 0x2028 or cp == 0x2029:
                b0 = np.uint8(32)  # whitespace that ``str.split`` splits on: a space
        one = b0 < 0x80  # one byte: ASCII (or the whitespace above)
        if one and bmap[b0] == 32:
            k_space = True  # the key's view: a run of spaces is written before what follows
        else:
            letters += 1
            if not one:
                wide = True
                unspaced += _unspaced_cp(cp)
            if k_space:
                key += _U(32) * pw[k_len]
                k_len += 1
                if not simplify:
                    m, hv = _put(c, h, m, hv, 32, pw)
                k_space = False
            for j in range(size):  # the bytes of a non-ASCII code point map to themselves
                b = bmap[src[i + j]]
                key += _U(b) * pw[k_len]
                k_len += 1
                if not simplify:
                    m, hv = _put(c, h, m, hv, b, pw)
        cls = classes[min(cp, limit)] if not one else classes[b0]
        if simplify and not (punct and cls == 1):
            as_digit = np.int64(digits and cls == 2)
            for j in range(1 if as_digit or one else size):
                b = np.uint8(48) if as_digit else (bmap[b0] if one else src[i + j])
                keep, state = _kept(b, as_digit, state)
                if keep:
                    m, hv = _put(c, h, m, hv, b, pw)
        i += size
    if k_space:  # a trailing space: texts come stripped, so never
        key += _U(32) * pw[k_len]
        k_len += 1
        if not simplify:
            m, hv = _put(c, h, m, hv, 32, pw)
    if simplify and m > 0 and c[m - 1] == 32:
        m -= 1
    by_char = wide and letters > 0 and unspaced >= ratio * letters
    return np.int64(_mix64(key + _U(k_len) * _LEN) >> _U(1)), m, by_char


@njit(cache=True)
def _shingles(c, m, char_mode, n_gram, salt, ipw, h, t_start, t_end, out):
    """Hashes of the shingles of c[:m] (prefix hashes ``h``) written to ``out``; how many."""
    n_tok = 0
    if char_mode:  # a token per UTF-8 character: from a lead byte to the next
        for i in range(m):
            if (c[i] & 0xC0) != 0x80:
                if n_tok:
                    t_end[n_tok - 1] = i
                t_start[n_tok] = i
                n_tok += 1
        if n_tok:
            t_end[n_tok - 1] = m
    else:  # a token per word: a run of bytes between spaces
        in_word = False
        for i in range(m):
            if c[i] == 32:
                if in_word:
                    t_end[n_tok] = i
                    n_tok += 1
                    in_word = False
            elif not in_word:
                t_start[n_tok] = i
                in_word = True
        if in_word:
            t_end[n_tok] = m
            n_tok += 1
    if n_tok >= n_gram:
        n_sh = n_tok - n_gram + 1
    else:
        n_sh = min(n_tok, 1)
    for i in range(n_sh):
        last = min(i + n_gram - 1, n_tok - 1)
        s, e = t_start[i], t_end[last]
        x = (h[e] - h[s]) * ipw[s]
        x ^= salt
        x *= _M1
        x ^= x >> _U(29)
        out[i] = x
    return n_sh


@njit(cache=True)
def _text(buf, off, d, shape, flags, salt, tables, c, h, t_start, t_end, out):
    """(exact key, number of shingle hashes in ``out``) of text ``d``.

    ``shape``: (word n, character n, unspaced ratio); ``flags``: (punctuation, digits)."""
    bmap, classes, pw, ipw = tables
    h[0] = _U(0)
    key, m, by_char = _views(buf, off[d], off[d + 1], bmap, classes, flags[0], flags[1],
                             shape[2], pw, c, h)
    n_gram = shape[1] if by_char else shape[0]
    return key, _shingles(c, m, by_char, n_gram, salt, ipw, h, t_start, t_end, out)


@njit(cache=True)
def _scratch(off):
    """Buffers for the longest text of the batch: its view, prefix hashes, token bounds."""
    size = np.max(np.diff(off)) + 1
    return (np.empty(size, np.uint8), np.empty(size + 1, np.uint64), np.empty(size, np.int64),
            np.empty(size, np.int64))


@njit(cache=True)
def fingerprint_batch(buf, off, shape, flags, salt, tables, probes, k):
    """(signatures (n, k) uint32, exact keys (n,) int64) of the texts buf[off[d]:off[d+1]].

    ``probes[j]``: the order in which empty bin j looks for a filled one."""
    n = len(off) - 1
    c, h, t_start, t_end = _scratch(off)
    out = np.empty(len(c) + 1, np.uint64)
    filled = np.empty(k, np.bool_)
    sigs = np.full((n, k), _EMPTY, np.uint32)
    keys = np.empty(n, np.int64)
    uk = _U(k)
    for d in range(n):
        keys[d], n_sh = _text(buf, off, d, shape, flags, salt, tables, c, h, t_start, t_end, out)
        if n_sh == 0:
            continue
        sig = sigs[d]
        for i in range(n_sh):  # one-permutation hashing: high half picks the bin
            x = out[i]
            cell = ((x >> _U(32)) * uk) >> _U(32)
            v = np.uint32(x & _U(0xFFFFFFFF)) >> np.uint32(1)
            sig[cell] = min(sig[cell], v)
        for j in range(k):
            filled[j] = sig[j] != _EMPTY
        for j in range(k):  # optimal densification: the first filled bin on j's probe order
            if not filled[j]:
                for t in range(k):
                    donor = probes[j, t]
                    if filled[donor]:
                        sig[j] = sig[donor]
                        break
    return sigs, keys


@njit(cache=True)
def shingle_hashes_batch(buf, off, shape, flags, salt, tables):
    """(hash per shingle, text index per shingle, exact key per text) of the batch's texts."""
    n = len(off) - 1
    c, h, t_start, t_end = _scratch(off)
    sh = np.empty(len(buf) + n, np.uint64)  # at most one per byte, or one per text
    sh_doc = np.empty(len(sh), np.int64)
    keys = np.empty(n, np.int64)
    at = 0
    for d in range(n):
        keys[d], n_sh = _text(buf, off, d, shape, flags, salt, tables, c, h, t_start, t_end,
                              sh[at:])
        sh_doc[at:at + n_sh] = d
        at += n_sh
    return sh[:at], sh_doc[:at], keys


@njit(cache=True)
def agreement(sigs, a, b):
    """Share of equal signature values of each pair (a[i], b[i]): their Jaccard estimate."""
    k = sigs.shape[1]
    est = np.empty(len(a), np.float64)
    for i in range(len(a)):
        ra, rb = sigs[a[i]], sigs[b[i]]
        same = 0
        for j in range(k):
            same += ra[j] == rb[j]
        est[i] = same / k
    return est


@njit(cache=True)
def _root(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]  # path halving
        x = parent[x]
    return x


@njit(cache=True)
def components(n, a, b):
    """Connected components of the graph with edges (a[i], b[i]): the smallest node index of
    each node's component (union-find; a root is always the smallest index of its set)."""
    parent = np.arange(n)
    for i in range(len(a)):
        ra, rb = _root(parent, a[i]), _root(parent, b[i])
        if ra < rb:
            parent[rb] = ra
        elif rb < ra:
            parent[ra] = rb
    for x in range(n):
        parent[x] = _root(parent, x)
    return parent
