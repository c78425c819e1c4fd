"""Near-duplicate detection on the T0 rows: sftflow's tasks.dedup against datasketch and rensa.

    .venv/bin/python bench/dedup.py [--rows N] [--workers 2] [--sample 3000]

All three use the same shingling (``tasks.dedup.shingles``: normalised text, punctuation deleted
and digit runs read as 0 (``normalize_punctuation``, the default), word 5-grams, or character
5-grams for unspaced scripts), threshold 0.8 and 128 permutations, on prompt + response.
sftflow also runs with ``normalize_punctuation`` and ``normalize_digits`` off (``sftflow_punct_off``).
Timings include shingling/hashing from raw text, LSH and grouping:

* sftflow: ``deduplicate`` end to end (normalise, fingerprint in a pool of ``--workers``
  processes, LSH, exact check of borderline pairs, keep rule). Also timed in one process.
* datasketch: ``MinHash.bulk`` + ``MinHashLSH`` (insert all, query each): candidate pairs.
* rensa: ``RMinHash.from_token_sets`` + ``RMinHashLSH`` (insert_many, query_all), with the
  band count datasketch picks for the same threshold.

Quality against exact Jaccard of the shingle sets:

* precision: share of a method's duplicate pairs (sftflow: verified pairs; the others: LSH
  candidate pairs, which they do not verify) whose exact Jaccard >= threshold, on a sample.
* recall: share of truly similar pairs that the method puts in one group (connected
  components of its pairs). The truly similar pairs come from a sample of a generous,
  independent candidate pool (LSH at Jaccard 0.5 with 256 permutations and another seed) and
  of random pairs, each checked exactly.
* pair recall: share of truly similar pairs found directly (identical normalised texts count).
* random pairs flagged: share of random pairs (almost all dissimilar) a method groups.

Each method is judged against the exact Jaccard of its own shingles. The ``punctuation`` section
judges sftflow with normalisation on and off against both definitions side by side (the ground
truth pool is drawn from candidates of both), and counts the pairs similar only when
punctuation and digits are normalised.

Writes bench/results/dedup.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sftflow.tasks import dedup as D
from sftflow.tasks.dedup.minhash import connected_components

DATA = Path(os.environ.get("SFTFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
TARGETS = {"rows_per_s": 50_000, "precision": 0.95, "recall": 0.90}


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return connected_components(n, np.asarray(a, np.int64), np.asarray(b, np.int64))


class Clock:
    """Wall time and CPU time (this process, all threads, plus the given worker processes).

    CPU seconds are less disturbed than wall time when other work shares the machine."""

    def __init__(self, pids=()):
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.wall = time.perf_counter()
        self.cpu = self._cpu()

    def _cpu(self) -> float:
        return time.process_time() + sum(sum(p.cpu_times()[:2]) for p in self.procs)

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, self._cpu() - self.cpu


def run_sftflow(rows, cfg, workers):
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        pids = []
        if pool:  # start the workers outside the timing, as a running flow would have them
            list(pool.map(D.fingerprint, [["warm up"]] * workers, [cfg] * workers))
            pids = list(pool._processes)
        clock = Clock(pids)
        res = D.deduplicate(rows, cfg, executor=pool, shard_rows=-(-len(rows) // (2 * workers)))
        return res, clock.stop()
    finally:
        if pool:
            pool.shutdown()


def run_datasketch(texts, cfg):
    from datasketch import MinHash, MinHashLSH

    clock = Clock()
    sets = [[s.encode("utf-8") for s in D.shingles(x, cfg)] for x in texts]
    mhs = MinHash.bulk(sets, num_perm=cfg.num_perm, seed=cfg.seed)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    with lsh.insertion_session() as session:
        for i, m in enumerate(mhs):
            session.insert(i, m, check_duplication=False)
    a, b = [], []
    for i, m in enumerate(mhs):
        for j in lsh.query(m):
            if j > i:
                a.append(i)
                b.append(j)
    elapsed = clock.stop()
    return np.array(a, np.int64), np.array(b, np.int64), elapsed, (lsh.b, lsh.r)


def simple_word_shingles(text: str, n: int) -> list[str]:
    """What a rensa user would write: lower case, split on whitespace, word n-grams."""
    w = text.lower().split()
    return [" ".join(w[i:i + n]) for i in range(max(1, len(w) - n + 1))]


def run_rensa(texts, cfg, bands, tokens="sftflow"):
    """``tokens``: "sftflow" (``D.shingles``, timed: the same definition, in Python),
    "given" (``D.shingles`` computed before the clock starts: rensa's own work only), or
    "simple" (``simple_word_shingles``, timed: rensa's usual input)."""
    from rensa import RMinHash, RMinHashLSH

    given = [list(D.shingles(x, cfg)) for x in texts] if tokens == "given" else None
    clock = Clock()
    if given is not None:
        sets = given
    elif tokens == "simple":
        sets = [simple_word_shingles(x, cfg.ngram) for x in texts]
    else:
        sets = [list(D.shingles(x, cfg)) for x in texts]
    mhs = RMinHash.from_token_sets(sets, cfg.num_perm, cfg.seed)
    lsh = RMinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, num_bands=bands)
    lsh_bands = lsh.get_num_bands()
    lsh.insert_many(mhs)
    a, b = [], []
    for i, cands in enumerate(lsh.query_all(mhs)):
        for j in cands:
            if j > i:
                a.append(i)
                b.append(j)
    elapsed = clock.stop()
    return np.array(a, np.int64), np.array(b, np.int64), elapsed, lsh_bands


def rensa_bands(num_perm: int, datasketch_bands: int, datasketch_rows: int) -> int:
    """rensa needs bands dividing num_perm: take the divisor whose S-curve midpoint
    (1/b)**(1/r) is closest to datasketch's."""
    target = (1 / datasketch_bands) ** (1 / datasketch_rows)
    divisors = [b for b in range(1, num_perm + 1) if num_perm % b == 0]
    return min(divisors, key=lambda b: abs((1 / b) ** (b / num_perm) - target))


def machine() -> dict:
    from importlib.metadata import version

    import datasketch
    import psutil
    import rensa  # noqa: F401

    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "numpy": np.__version__,
        "datasketch": datasketch.__version__,
        "rensa": version("rensa"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=0, help="use the first N rows (0 = all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sample", type=int, default=3000, help="pairs checked exactly per pool")
    ap.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="runs of sftflow and rensa; the best time counts (datasketch: 1 run)",
    )
    ap.add_argument(
        "--margin",
        type=float,
        default=D.DedupConfig().verify_margin,
        help="verify_margin of the main sftflow run",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dedup.json")
    args = ap.parse_args()

    path = DATA / "t0_train_50k.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    if args.rows:
        raw = raw[: args.rows]
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in raw]
    cfg = D.DedupConfig(verify_margin=args.margin)
    texts = [D.dedup_text(r["prompt"], r["completion"], cfg) for r in rows]
    n = len(rows)
    info = machine()
    D.lsh_params(cfg.threshold, cfg.num_perm)  # a cached table, computed once per process
    print(f"{n} rows, {sum(map(len, texts)) / 1e6:.1f} M characters; {info['cores']} cores")

    est_cfg = cfg.model_copy(update={"verify_margin": 0.0})

    def best(fn, *a):  # best of --repeat runs: the machine is shared, noise only adds time
        runs = [fn(*a) for _ in range(args.repeat)]
        return runs[0][0], min(r[1] for r in runs)  # (wall, cpu) of the fastest run

    res, (t_pool, c_pool) = best(run_sftflow, rows, cfg, args.workers)
    res_est, (t_est, c_est) = best(run_sftflow, rows, est_cfg, args.workers)
    off_cfg = cfg.model_copy(update={"normalize_punctuation": False, "normalize_digits": False})
    res_off, (t_off, c_off) = best(run_sftflow, rows, off_cfg, args.workers)
    _, (t_one, c_one) = best(run_sftflow, rows, cfg, 1)
    print(
        f"sftflow: {t_pool:.2f} s with {args.workers} processes, {t_one:.2f} s in one; "
        f"estimate only: {t_est:.2f} s; punctuation kept: {t_off:.2f} s"
    )
    da, db, (t_ds, c_ds), (bands, band_rows) = run_datasketch(texts, cfg)
    print(f"datasketch: {t_ds:.2f} s")
    r_runs = [
        run_rensa(texts, cfg, rensa_bands(cfg.num_perm, bands, band_rows))
        for _ in range(args.repeat)
    ]
    ra, rb, _, r_bands = r_runs[0]
    t_rs, c_rs = min(r[2] for r in r_runs)
    print(f"rensa: {t_rs:.2f} s")
    # Equal terms (issue #19): one process each; rensa also without the tokenising (given the
    # shingle sets) and with a plain whitespace tokeniser of its user's.
    rensa_alone = {}
    for tokens in ("given", "simple"):
        runs = [run_rensa(texts, cfg, r_bands, tokens)[2] for _ in range(args.repeat)]
        rensa_alone[tokens] = min(runs)
        print(f"rensa, tokens {tokens}: {rensa_alone[tokens][0]:.2f} s")
    _, (t_one_off, c_one_off) = best(run_sftflow, rows, cfg.model_copy(
        update={"normalize_punctuation": False, "normalize_digits": False}), 1)

    fp = D.fingerprint(texts, cfg)
    fp_off = D.fingerprint(texts, off_cfg)
    _, reps = np.unique(fp.keys, return_index=True)  # the pairs cluster() sees

    def accepted(c, f=fp):
        a, b, _ = D.similar_pairs(f.sigs[reps], c, f.keys[reps], [texts[i] for i in reps])
        return reps[a], reps[b]

    sa, sb = accepted(cfg)
    ea, eb = accepted(est_cfg)
    oa, ob = accepted(off_cfg, fp_off)

    groups = {
        "sftflow": res.cluster_id,
        "sftflow_estimate": res_est.cluster_id,
        "sftflow_punct_off": res_off.cluster_id,
        "datasketch": components(n, da, db),
        "rensa": components(n, ra, rb),
    }
    pairs = {
        "sftflow": (sa, sb),
        "sftflow_estimate": (ea, eb),
        "sftflow_punct_off": (oa, ob),
        "datasketch": (da, db),
        "rensa": (ra, rb),
    }

    # Exact Jaccard of each definition's shingles, cached per text.
    caches: dict[bool, dict[int, set]] = {True: {}, False: {}}

    def jac(i: int, j: int, punct: bool = True) -> float:
        cache, c = caches[punct], (cfg if punct else off_cfg)
        for k in (i, j):
            if k not in cache:
                cache[k] = D.shingles(texts[k], c)
        x, y = cache[i], cache[j]
        return len(x & y) / len(x | y) if x | y else 1.0

    rng = np.random.default_rng(7)
    gen_pairs = []
    for punct in (True, False):  # candidates under either definition
        gen_cfg = D.DedupConfig(threshold=0.5, num_perm=256, seed=99,
                                normalize_punctuation=punct, normalize_digits=punct)
        gfp = D.fingerprint(texts, gen_cfg)
        gen_pairs.append(np.stack(D.candidate_pairs(gfp.sigs, gen_cfg, gfp.keys)))
    ga, gb = np.unique(np.concatenate(gen_pairs, axis=1), axis=1)
    pick = rng.choice(len(ga), size=min(args.sample, len(ga)), replace=False)
    rand_a = rng.integers(0, n, size=args.sample)
    rand_b = rng.integers(0, n, size=args.sample)
    keep_r = rand_a != rand_b
    rand_a, rand_b = rand_a[keep_r], rand_b[keep_r]
    pool_a = np.concatenate([ga[pick], rand_a])
    pool_b = np.concatenate([gb[pick], rand_b])
    pool_js = {
        punct: np.array(
            [jac(int(i), int(j), punct) for i, j in zip(pool_a, pool_b, strict=True)]
        )
        for punct in (True, False)
    }
    pool_j = pool_js[True]
    true = pool_j >= cfg.threshold
    true_off = pool_js[False] >= cfg.threshold
    print(
        f"ground truth: {len(pool_a)} pairs checked, {int(true.sum())} similar "
        f"({int(true_off.sum())} with punctuation kept)"
    )

    def precision(a, b, punct: bool) -> float:
        s = rng.choice(len(a), size=min(args.sample, len(a)), replace=False) if len(a) else []
        if not len(s):
            return 0.0
        return float(np.mean([jac(int(a[i]), int(b[i]), punct) >= cfg.threshold for i in s]))

    results = {}
    for name, (a, b) in pairs.items():
        g = groups[name]
        punct = name != "sftflow_punct_off"  # judged by its own shingles
        truth = true if punct else true_off
        prec = precision(a, b, punct)
        same = g[pool_a] == g[pool_b]
        edge = set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist(), strict=True))
        direct = np.array(
            [
                (min(i, j), max(i, j)) in edge or fp.keys[i] == fp.keys[j]
                for i, j in zip(pool_a.tolist(), pool_b.tolist(), strict=True)
            ]
        )
        secs, cpu = {
            "sftflow": (t_pool, c_pool),
            "sftflow_estimate": (t_est, c_est),
            "sftflow_punct_off": (t_off, c_off),
            "datasketch": (t_ds, c_ds),
            "rensa": (t_rs, c_rs),
        }[name]

        results[name] = {
            "seconds": round(secs, 3),
            "rows_per_s": round(n / secs),
            "cpu_seconds": round(cpu, 3),
            "rows_per_cpu_s": round(n / cpu),
            "pairs": len(a),
            "precision": round(prec, 4),
            "recall": round(float(same[truth].mean()), 4),
            "pair_recall": round(float(direct[truth].mean()), 4),
            "random_pairs_flagged": round(
                float(same[len(pick) :][pool_js[punct][len(pick) :] < cfg.threshold].mean()), 5
            ),
            "rows_removed": int(n - len(np.unique(g))),
        }
    results["sftflow"]["seconds_one_process"] = round(t_one, 3)
    results["sftflow"]["rows_per_s_one_process"] = round(n / t_one)
    results["sftflow"]["cpu_seconds_one_process"] = round(c_one, 3)
    results["sftflow_punct_off"]["seconds_one_process"] = round(t_one_off, 3)
    results["sftflow_punct_off"]["cpu_seconds_one_process"] = round(c_one_off, 3)
    for tokens, (t, c) in rensa_alone.items():
        results["rensa"][f"seconds_tokens_{tokens}"] = round(t, 3)
        results["rensa"][f"cpu_seconds_tokens_{tokens}"] = round(c, 3)
    # One process each, sftflow timing its own normalising and shingling throughout.
    equal_terms = {
        "processes": 1,
        "sftflow_s": round(t_one, 3),
        "rensa_given_shingles_s": round(rensa_alone["given"][0], 3),
        "rensa_simple_tokens_s": round(rensa_alone["simple"][0], 3),
        "rensa_sftflow_tokens_s": round(t_rs, 3),
        "x_rensa_given_shingles": round(rensa_alone["given"][0] / t_one, 2),
        "x_rensa_simple_tokens": round(rensa_alone["simple"][0] / t_one, 2),
        "x_rensa_simple_tokens_vs_punct_off": round(rensa_alone["simple"][0] / t_one_off, 2),
        "target_x": 2.5,
    }
    print("equal terms, one process each: " + json.dumps(equal_terms))
    results["sftflow"]["dropped"] = res.dropped
    results["sftflow"]["clusters_removed"] = res.clusters_removed

    # Did each dropped row really resemble the row kept in its cluster?
    kept_of = {int(c): i for i, c in enumerate(res.cluster_id) if res.keep[i]}
    dropped = np.flatnonzero(~res.keep)
    ds = rng.choice(dropped, size=min(args.sample, len(dropped)), replace=False)
    dj = np.array([jac(int(i), kept_of[int(res.cluster_id[i])]) for i in ds])
    results["sftflow"]["dropped_rows_similar_to_kept"] = round(
        float((dj >= cfg.threshold).mean()), 4
    )

    # Punctuation normalisation on and off, each judged by both definitions.
    punctuation = {"similar_only_normalised": int((true & ~true_off).sum()),
                   "similar_only_kept": int((~true & true_off).sum()),
                   "similar_both": int((true & true_off).sum())}
    only = np.flatnonzero(true & ~true_off)
    digits = re.compile(r"\d+")
    digit_only = [i for i in only
                  if digits.findall(texts[pool_a[i]]) != digits.findall(texts[pool_b[i]])]
    punctuation["similar_only_normalised_texts_differ_in_digits"] = len(digit_only)
    for name, (a, b), g in (("on", (sa, sb), res.cluster_id),
                            ("off", (oa, ob), res_off.cluster_id)):
        same = g[pool_a] == g[pool_b]
        punctuation[name] = {
            f"vs_{truth_name}": {
                "precision": round(precision(a, b, punct), 4),
                "recall": round(float(same[truth].mean()), 4),
            }
            for truth_name, punct, truth in (("normalised", True, true),
                                              ("punctuation_kept", False, true_off))
        } | {"rows_removed": int(n - len(np.unique(g)))}
    print("punctuation normalisation (precision / recall against each definition):")
    for name in ("on", "off"):
        r = punctuation[name]
        print(
            f"  {name:3}: vs normalised {r['vs_normalised']['precision']:.3f} / "
            f"{r['vs_normalised']['recall']:.3f}; vs punctuation kept "
            f"{r['vs_punctuation_kept']['precision']:.3f} / "
            f"{r['vs_punctuation_kept']['recall']:.3f}; rows removed {r['rows_removed']:,}"
        )
    print(
        f"  pool pairs similar only when normalised: {punctuation['similar_only_normalised']} "
        f"(of which differing in digits: "
        f"{punctuation['similar_only_normalised_texts_differ_in_digits']}); only when kept: "
        f"{punctuation['similar_only_kept']}"
    )

    own = results["sftflow"]
    met = {
        "rows_per_s": own["rows_per_s"] >= TARGETS["rows_per_s"],
        "precision": own["precision"] >= TARGETS["precision"],
        "recall": own["recall"] >= TARGETS["recall"],
    }
    out = {
        "benchmark": "dedup",
        "data": {"file": path.name, "rows": n, "on": cfg.on},
        "config": cfg.model_dump()
        | {
            "lsh_bands_rows": list(D.lsh_params(cfg.threshold, cfg.num_perm)),
            "datasketch_bands_rows": [int(bands), int(band_rows)],
            "rensa_bands": int(r_bands),
            "workers": args.workers,
        },
        "machine": info | {"load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "timing": f"best of {args.repeat} runs (datasketch: 1 run); pool workers started "
        "before timing; everything from raw text to groups is timed",
        "targets": TARGETS,
        "targets_met": met,
        "equal_terms": equal_terms,
        "ground_truth": {
            "pairs_checked": len(pool_a),
            "similar": int(true.sum()),
            "from_candidate_pool": len(pick),
            "random": len(rand_a),
        },
        "results": results,
        "punctuation": punctuation,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    cols = (
        "method",
        "wall s",
        "rows/s",
        "CPU s",
        "rows/CPU-s",
        "precision",
        "recall",
        "pairR",
        "rand FP",
        "removed",
    )
    table = [cols] + [
        (
            name,
            f"{r['seconds']:.2f}",
            f"{r['rows_per_s']:,}",
            f"{r['cpu_seconds']:.2f}",
            f"{r['rows_per_cpu_s']:,}",
            f"{r['precision']:.3f}",
            f"{r['recall']:.3f}",
            f"{r['pair_recall']:.3f}",
            f"{r['random_pairs_flagged']:.4f}",
            f"{r['rows_removed']:,}",
        )
        for name, r in results.items()
    ]
    for i, line in enumerate(table):  # a markdown table, pasted into docs/dedup.md
        print("| " + " | ".join(line) + " |")
        if i == 0:
            print("|" + "---|" * len(cols))
    print(
        f"sftflow in one process: {own['seconds_one_process']:.2f} s, "
        f"{own['rows_per_s_one_process']:,} rows/s; dropped rows similar to kept: "
        f"{own['dropped_rows_similar_to_kept']:.3f}"
    )
    print("targets met:", met)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    random.seed(0)
    main()
