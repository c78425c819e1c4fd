"""The signature index of a project's prompts: near-duplicate prompts stopped at ingest.

``SignatureIndex`` (pure, in memory) holds one MinHash signature per prompt in the project
(``tasks.dedup``'s code, prompt text only, punctuation ignored, digits kept: ``prompt_config``)
with its prompt_id, its Label Studio task id when known (``-1`` until looked up) and the ingest
batch that imported it. ``check`` finds, for new prompts, the first one already in the index or
earlier in the same list whose estimated Jaccard reaches the threshold.

Stored next to the ingest ledger (``tasks.ingest.ledger.Ledger``) as ``.npz`` files (no pickles)::

    ingest/project-<id>/signatures/snapshot.npz        every prompt at the last rebuild/compaction
    ingest/project-<id>/signatures/segments/<batch>.npz the prompts of one confirmed batch

A segment is written after its batch's ledger segment, so the ledger can be ahead of the index
(a crash between the two), never behind. ``load_index`` returns what is stored; the importer
compares its prompt_ids with the ledger's and rebuilds it from Label Studio when they differ.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.dedup import DedupConfig, lsh_params
from sftflow.tasks.dedup import minhash as _mh
from sftflow.tasks.dedup.hashing import mix64

INDEX_FORMAT = 1


def prompt_config(threshold: float) -> DedupConfig:
    """How prompts are compared at ingest: the prompt alone, word 5-grams, punctuation ignored,
    digits kept (prompts that differ only in their numbers are different questions), decided on
    the signature estimate (the index keeps no texts)."""
    return DedupConfig(on="prompt", threshold=threshold, normalize_digits=False, verify_margin=0.0)


def _signature_meta(cfg: DedupConfig) -> dict:
    """What makes stored signatures comparable (the threshold does not)."""
    return {"format": INDEX_FORMAT, **cfg.model_dump(include={
        "ngram", "char_ngram", "num_perm", "seed", "normalize_punctuation", "normalize_digits",
        "unspaced_ratio"})}


@dataclass(frozen=True)
class Match:
    """A new prompt's closest earlier prompt: in the index (``row`` of the index) or earlier in
    the same query (``query_row``)."""

    prompt_id: str
    similarity: float  # estimated Jaccard of the shingle sets


class SignatureIndex:
    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.ids: list[str] = []
        self.task_ids = np.zeros(0, dtype=np.int64)
        self.batches: list[str] = []
        self.sigs = np.zeros((0, cfg.num_perm), dtype=np.uint32)
        self._row: dict[str, int] = {}
        self._bands: list[tuple[np.ndarray, np.ndarray]] | None = None  # per band: sorted hashes, rows

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: Sequence[str], sigs: np.ndarray, task_ids: Sequence[int] | None = None,
            batches: Sequence[str] | None = None) -> None:
        """Append prompts (ids already present are skipped)."""
        new = [i for i, pid in enumerate(ids) if pid not in self._row]
        if not new:
            return
        for i in new:
            self._row[ids[i]] = len(self.ids)
            self.ids.append(ids[i])
            self.batches.append(batches[i] if batches is not None else "")
        tids = np.asarray(task_ids if task_ids is not None else [-1] * len(ids), dtype=np.int64)
        self.task_ids = np.concatenate([self.task_ids, tids[new]])
        self.sigs = np.concatenate([self.sigs, np.asarray(sigs, dtype=np.uint32)[new]])
        self._bands = None

    def row(self, prompt_id: str) -> int | None:
        return self._row.get(prompt_id)

    def set_task_ids(self, task_ids: dict[str, int]) -> None:
        """Record the Label Studio task ids of prompts in the index (others are ignored)."""
        for pid, tid in task_ids.items():
            if (r := self._row.get(pid)) is not None:
                self.task_ids[r] = tid

    def _band_hashes(self, sigs: np.ndarray) -> np.ndarray:
        bands, r = lsh_params(self.cfg.threshold, self.cfg.num_perm)
        mult = mix64(np.arange(1, r + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        out = np.empty((len(sigs), bands), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for band in range(bands):
                block = sigs[:, band * r : (band + 1) * r].astype(np.uint64)
                out[:, band] = mix64((block * mult).sum(axis=1, dtype=np.uint64) + np.uint64(band))
        return out

    def _lookup(self, sigs: np.ndarray, window: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(best index row or -1, its estimate) per query signature, by LSH banding."""
        best = np.full(len(sigs), -1, dtype=np.int64)
        est = np.zeros(len(sigs))
        if not len(self) or not len(sigs):
            return best, est
        if self._bands is None:
            bh = self._band_hashes(self.sigs)
            live = np.flatnonzero(self.sigs[:, 0] != _mh._EMPTY)
            self._bands = []
            for band in range(bh.shape[1]):
                order = live[np.argsort(bh[live, band], kind="stable")]
                self._bands.append((bh[order, band], order))
        qh = self._band_hashes(sigs)
        qa, ia = [], []
        for band, (hashes, rows) in enumerate(self._bands):
            lo = np.searchsorted(hashes, qh[:, band], side="left")
            hi = np.minimum(np.searchsorted(hashes, qh[:, band], side="right"), lo + window)
            n = hi - lo
            q = np.repeat(np.arange(len(sigs)), n)
            qa.append(q)
            ia.append(rows[np.repeat(lo, n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)])
        q, i = np.concatenate(qa), np.concatenate(ia)
        live_q = sigs[q, 0] != _mh._EMPTY
        q, i = q[live_q], i[live_q]
        if len(q):
            e = (sigs[q] == self.sigs[i]).mean(axis=1)
            order = np.lexsort((i, -e))  # best estimate first, then the oldest row
            q, i, e = q[order], i[order], e[order]
            _, first = np.unique(q, return_index=True)
            best[q[first]], est[q[first]] = i[first], e[first]
        return best, est

    def check(self, ids: Sequence[str], sigs: np.ndarray) -> list[Match | None]:
        """For each new prompt (in order), the earlier prompt it near-duplicates, if any:
        one in the index, or else an earlier one of ``ids`` that is not itself a near-duplicate.
        Nothing is added to the index."""
        t = self.cfg.threshold - 1e-9
        out: list[Match | None] = [None] * len(ids)
        best, est = self._lookup(sigs)
        for q in np.flatnonzero((best >= 0) & (est >= t)):
            out[q] = Match(self.ids[best[q]], float(est[q]))
        rest = np.flatnonzero([m is None for m in out])
        if len(rest) > 1:
            a, b = _mh.candidate_pairs(sigs[rest], self.cfg)
            if len(a):
                e = (sigs[rest[a]] == sigs[rest[b]]).mean(axis=1)
                ok = e >= t
                a, b, e = a[ok], b[ok], e[ok]
                for k in np.lexsort((a, b)):  # by the later prompt, then its earliest match
                    qa, qb = rest[a[k]], rest[b[k]]
                    if out[qb] is None and out[qa] is None:
                        out[qb] = Match(ids[qa], float(e[k]))
        return out


# -- storage ------------------------------------------------------------------------------------


def _index_root(ledger_root: str) -> str:
    return f"{ledger_root}/signatures"


def _to_npz(ids: Sequence[str], sigs: np.ndarray, task_ids: np.ndarray, batches: Sequence[str],
            cfg: DedupConfig) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, ids=np.array(list(ids), dtype="U32"), sigs=np.asarray(sigs, dtype=np.uint32),
             task_ids=np.asarray(task_ids, dtype=np.int64),
             batches=np.array(list(batches), dtype="U64"),
             meta=np.array(json.dumps(_signature_meta(cfg))))
    return buf.getvalue()


def _from_npz(body: bytes, cfg: DedupConfig) -> tuple[list[str], np.ndarray, np.ndarray, list[str]] | None:
    """The stored arrays, validated; None when they are of another format or configuration."""
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            ids, sigs, tids, batches = z["ids"], z["sigs"], z["task_ids"], z["batches"]
    except (OSError, ValueError, KeyError):
        return None
    n = len(ids)
    if (meta != _signature_meta(cfg) or sigs.dtype != np.uint32 or sigs.shape != (n, cfg.num_perm)
            or tids.shape != (n,) or batches.shape != (n,)):
        return None
    return ids.tolist(), sigs, tids.astype(np.int64), batches.tolist()


def load_index(s3: S3, bucket: str, ledger_root: str, cfg: DedupConfig) -> tuple[SignatureIndex | None, int]:
    """(the stored index or None if absent or unreadable, how many segments it came from)."""
    root = _index_root(ledger_root)
    keys = sorted(o.key for o in s3.list(root + "/", bucket=bucket))
    if not keys:
        return None, 0
    index = SignatureIndex(cfg)
    segments = 0
    snap = f"{root}/snapshot.npz"
    for key in ([snap] if snap in keys else []) + [k for k in keys if k != snap]:
        try:
            body = s3.get_bytes(key, bucket=bucket)[0]
        except KeyError:
            return None, 0
        parts = _from_npz(body, cfg)
        if parts is None:
            return None, 0
        ids, sigs, tids, batches = parts
        index.add(ids, sigs, tids, batches)
        segments += key != snap
    return index, segments


def save_segment(s3: S3, bucket: str, ledger_root: str, batch: str, index: SignatureIndex,
                 ids: Sequence[str]) -> None:
    """The index rows of ``ids`` (one confirmed batch) as the batch's segment."""
    rows = [r for r in (index.row(p) for p in ids) if r is not None]
    body = _to_npz([index.ids[r] for r in rows], index.sigs[rows], index.task_ids[rows],
                   [index.batches[r] for r in rows], index.cfg)
    s3.put_bytes(f"{_index_root(ledger_root)}/segments/{batch}.npz", body, bucket=bucket)


def save_snapshot(s3: S3, bucket: str, ledger_root: str, index: SignatureIndex) -> None:
    """The whole index as the snapshot; segments are then dropped (a crash between the two
    leaves segments whose rows the snapshot already holds: harmless)."""
    root = _index_root(ledger_root)
    s3.put_bytes(f"{root}/snapshot.npz",
                 _to_npz(index.ids, index.sigs, index.task_ids, index.batches, index.cfg),
                 bucket=bucket)
    s3.delete([o.key for o in s3.list(f"{root}/segments/", bucket=bucket)], bucket=bucket)


def near_duplicate_key(state_prefix: str, key: str, etag: str) -> str:
    """Quarantine key of the near-duplicate prompts of one source object version."""
    return f"{state_prefix.rstrip('/')}/quarantine/near_duplicates/{key}@{etag.strip(chr(34))}.jsonl"
