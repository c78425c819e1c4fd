"""MinHash signatures and LSH: fingerprints of texts, candidate pairs, verified similar pairs.

3. *Fingerprint* (``fingerprint``): one 64-bit hash per shingle (``shingling.shingle_hashes``),
   computed for the whole batch at once with polynomial prefix hashes over the UTF-8 bytes,
   then a MinHash signature of ``num_perm`` 32-bit values by one-permutation hashing (Li, Owen
   & Zhang 2012) with optimal densification (Shrivastava 2017): each shingle hash picks one bin
   and the bin keeps its minimum; empty bins copy a filled bin chosen by a fixed,
   text-independent probe sequence. Two signatures agree in a bin with probability equal to
   the Jaccard similarity of the shingle sets, as with ``num_perm`` independent permutations,
   at the cost of one hash per shingle instead of ``num_perm``. The exact key (a 63-bit hash of
   the normalised text, punctuation kept) comes out of the same pass. Fingerprints of shards
   concatenate (``Fingerprints.concat``): a shard's result does not depend on the other shards.
4. *Pairs*: LSH banding (``lsh_params``: b bands of r rows chosen for the threshold, biased
   toward recall) gives candidate pairs (``candidate_pairs``); a pair is accepted when its
   Jaccard estimate (share of equal signature values) clears ``threshold + verify_margin``,
   and, within ``verify_margin`` of the threshold, by its exact Jaccard when the texts are
   given (``similar_pairs``, ``exact_jaccard``). ``connected_components`` merges accepted pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from sftflow.tasks.dedup.config import DedupConfig
from sftflow.tasks.dedup.hashing import U64, mix64
from sftflow.tasks.dedup.kernel import agreement, components, fingerprint_batch
from sftflow.tasks.dedup.shingling import batch_inputs, prepare, shingle_hashes

_EMPTY = np.uint32(0xFFFFFFFF)  # an empty OPH bin; real values are capped one below


@lru_cache(maxsize=16)
def _probes(num_perm: int, seed: int) -> np.ndarray:
    """(num_perm, num_perm): row j is the fixed order in which empty bin j looks for a donor."""
    rng = np.random.default_rng([seed, num_perm, 0x0DE5])
    return np.stack([rng.permutation(num_perm) for _ in range(num_perm)])  # [j, t]


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


def fingerprint(
    texts: Sequence[str], cfg: DedupConfig, *, chunk_bytes: int = 1 << 20
) -> Fingerprints:
    """Signatures and exact keys of ``texts`` (raw, normalised here). Pure; run it per shard."""
    pre = [prepare(t) for t in texts]
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
    """One-permutation hashing (the high half of a shingle hash picks the bin, the low 31 bits
    are the value, so it never equals the empty-bin marker), then empty bins filled from the
    first filled bin on each bin's fixed probe sequence: in ``kernel.fingerprint_batch``."""
    return fingerprint_batch(*batch_inputs(pre, cfg), _probes(cfg.num_perm, cfg.seed),
                             cfg.num_perm)


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


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph: the smallest node index per node."""
    return components(n, np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))


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
    mult = mix64(np.arange(1, r + 1, dtype=U64) * U64(0x9E3779B97F4A7C15))
    out = []
    live = live[np.argsort(order_keys[live], kind="stable")]  # ties in a bucket: in key order
    rows = sigs[live].astype(U64)
    for band in range(bands):
        with np.errstate(over="ignore"):
            bh = mix64((rows[:, band * r : (band + 1) * r] * mult).sum(axis=1, dtype=U64)
                       + U64(band))
        order = np.argsort(bh, kind="stable")
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
    # the same pair comes from many bands: a hash table drops the repeats, then the few left
    # are sorted (pandas' unique is O(n); numpy's sorts all of them)
    code = np.sort(pd.unique(a * np.int64(n) + b))
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
    pre = [prepare(texts[i]) for i in docs]
    for i, t in enumerate(pre):  # batches of about 1 MB, as in fingerprint
        size += len(t)
        if size >= 1 << 20 or i == len(pre) - 1:
            sh, sh_doc, _ = shingle_hashes(pre[start : i + 1], cfg)
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
    est = agreement(sigs, a, b)
    if texts is None or margin <= 0:
        ok = est >= cfg.threshold - 1e-9
        return a[ok], b[ok], est[ok]
    ok = est >= cfg.threshold + margin
    border = np.flatnonzero(np.abs(est - cfg.threshold) < margin)
    pending = border[np.argsort(-est[border], kind="stable")]  # likeliest first
    n = len(sigs)
    for _ in range(max_rounds):
        comp = connected_components(n, a[ok], b[ok])
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




def compile_kernels() -> None:
    """Compile (or load from numba's cache) every kernel with the argument types the pipeline
    uses, so no flow or test pays the ~10 s of compilation: ``make install`` runs it."""
    cfg = DedupConfig()
    texts = ["one two three four five six seven", "one two three four five six eight",
             "一二三四五六七八九十", ""]
    fp = fingerprint(texts, cfg)
    similar_pairs(fp.sigs, cfg, fp.keys, texts)
    exact_jaccard(texts, np.array([0, 1]), np.array([1, 2]), cfg)
    connected_components(len(texts), np.array([0]), np.array([1]))
