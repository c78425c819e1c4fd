"""tasks.dedup: shingling, signatures, clustering, keep rule and split — pure, no services."""

from __future__ import annotations

import gzip
import json
import random
from itertools import islice

import numpy as np
import pytest
from pydantic import ValidationError

from sftflow.tasks.dedup import (
    DedupConfig,
    Fingerprints,
    cluster,
    dedup_text,
    deduplicate,
    fingerprint,
    is_unspaced,
    leakage,
    normalize,
    shingles,
    shingling,
    signatures,
    split_by_cluster,
)
from sftflow.tasks.dedup import minhash as D
from sftflow.tasks.dedup.text import simplify

CFG = DedupConfig()
M64 = 2**64

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
]


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(n)]


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def reference_signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """The signature written out slowly from ``shingles``: what ``fingerprint`` must equal."""
    base = int(shingling._BASE)
    salt = int(shingling._seed_salt(cfg.seed))
    k = cfg.num_perm
    sig = np.full((1, k), D._EMPTY, dtype=np.uint32)
    for s in shingles(text, cfg):
        h, p = 0, 1
        for byte in s.encode("utf-8"):
            h, p = (h + byte * p) % M64, p * base % M64
        x = ((h ^ salt) * 0xBF58476D1CE4E5B9) % M64
        x ^= x >> 29
        b, v = ((x >> 32) * k) >> 32, (x & 0xFFFFFFFF) >> 1
        sig[0, b] = min(int(sig[0, b]), v)
    row = sig[0]
    filled = row != D._EMPTY
    if filled.any():  # optimal densification, written out: the first filled bin on j's probes
        probes = D._probes(k, cfg.seed)
        for j in np.flatnonzero(~filled):
            row[j] = next(row[p] for p in probes[j] if filled[p])
    return row


EDGE_TEXTS = [
    "",
    "   \t\n ",
    "Hello",
    "Hello   World  foo bar baz qux",
    "\tThe quick brown fox\n jumps over the lazy dog  ",
    "one two three four",  # shorter than n=5: one shingle
    "介绍一下中国平安保险集团.",
    "中国 平安",
    "Ünïcödé  ｆｕｌｌｗｉｄｔｈ text here with some words",
    "日本語のテキストです、スペースなし。",
    "Straße STRASSE ﬁne",
    " Ünï\tcödé\n\n FOO  bar baz qux quux\u00a0corge ",
    "\u3000中文\t文本\u0085测试一下这段文字 ",
    "line one\u2028line two  three four five six",
    "x" * 3,
    # punctuation and digits (simplified for near-duplicate shingles only)
    "!!! ... ???",
    "a - b -- c; d: e, f. g!",
    "- leading and trailing -",
    "Call 555-1234 at 3.14 pm, or in 2024!",
    "x1y22 333 z 4 5",
    "¿Qué tal? ¡Muy bien! «Gracias» — dijo.",
    "「你好」，世界！１２３ 和 ٤٥٦",
    "word , word . word ? word ! word",
    "Ünïcödé — ok . . .",
]


# -- normalisation and shingles -------------------------------------------------------------------


def test_normalize_matches_prompt_id_normalisation():
    from sftflow.tasks.ingest.prompts import normalise

    samples = EDGE_TEXTS + ["A\u00a0B\u2003C\u3000D", "  MiXeD\r\nCase\x1c sep  ", "Ǆ ǅ ǆ ß ﬃ"]
    for s in samples:
        assert normalize(s) == normalise(s)


def test_shingles_words_chars_and_short_text():
    assert shingles("A b  C d e f", CFG) == {"a b c d e", "b c d e f"}
    assert shingles("one two three", CFG) == {"one two three"}
    assert shingles("", CFG) == set()
    zh = shingles("介绍一下中国平安保险集团", CFG)
    assert "介绍一下中" in zh and len(zh) == 12 - 5 + 1
    assert not is_unspaced("hello world")
    assert is_unspaced("请把这句话翻译成英文 hello")


def test_dedup_text_follows_config():
    assert dedup_text("P", "R", CFG) == "P\nR"
    assert dedup_text("P", "R", DedupConfig(on="prompt")) == "P"


def test_config_validates():
    with pytest.raises(ValidationError):
        DedupConfig(threshold=1.5)
    with pytest.raises(ValidationError):
        DedupConfig(on="response")


# -- fingerprints ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        DedupConfig(ngram=2, char_ngram=3, num_perm=64, seed=7),
        DedupConfig(normalize_punctuation=False),
        DedupConfig(ngram=1, char_ngram=2, normalize_punctuation=False),
        DedupConfig(normalize_digits=False),
        DedupConfig(ngram=2, normalize_punctuation=False, normalize_digits=True),
        DedupConfig(normalize_punctuation=False, normalize_digits=False),
    ],
)
def test_fingerprint_equals_reference_signature(cfg):
    texts = EDGE_TEXTS + [" ".join(words(40, 1)), "".join(words(30, 2))]
    fp = fingerprint(texts, cfg)
    assert fp.sigs.shape == (len(texts), cfg.num_perm) and fp.sigs.dtype == np.uint32
    for text, sig in zip(texts, fp.sigs, strict=True):
        assert np.array_equal(sig, reference_signature(text, cfg)), text


def test_fingerprint_is_per_shard_and_mergeable():
    texts = [" ".join(words(30 + i, i)) for i in range(60)] + EDGE_TEXTS
    whole = fingerprint(texts, CFG)
    parts = Fingerprints.concat([fingerprint(texts[:17], CFG), fingerprint(texts[17:], CFG)])
    tiny_chunks = fingerprint(texts, CFG, chunk_bytes=64)
    for other in (parts, tiny_chunks):
        assert np.array_equal(whole.sigs, other.sigs)
        assert np.array_equal(whole.keys, other.keys)
    assert np.array_equal(signatures(texts, CFG), whole.sigs)


def test_exact_keys_are_keys_of_the_normalised_text():
    texts = ["Hello  World", "hello world", " HELLO\tWORLD ", "hello worlds", "", "  "]
    keys = fingerprint(texts, CFG).keys
    assert keys[0] == keys[1] == keys[2] and keys[3] != keys[0]
    assert keys[4] == keys[5] and keys[4] != keys[0]
    assert np.array_equal(keys, fingerprint([normalize(t) for t in texts], CFG).keys)
    assert (keys >= 0).all()


# Exact keys computed on main before punctuation normalisation existed: they must not move.
PINNED_TEXTS = [
    "",
    "Hello",
    "How does a bridge work?",
    "Explain how a bridge works.",
    "Ünïcödé  ｆｕｌｌｗｉｄｔｈ text, here!",
    "介绍一下中国平安保险集团。",
    "Call 555-1234 at 3.14 pm",
    " Tabs\tand  spaces; ok? ",
]
PINNED_KEYS = [
    0,
    871726215374999461,
    2354735032545241091,
    3012343332359169281,
    5555973061344622010,
    7101110171582289812,
    241765593064911395,
    3354995209715948942,
]
#: sha256 of those texts' signatures with punctuation kept (the behaviour before the option).
PINNED_SIGS_PUNCTUATION_KEPT = "520af139628885698ec223d5f7302905f3be951900d0ff0f182edc8eb5b13275"


@pytest.mark.parametrize("on", [True, False])
def test_exact_keys_are_unchanged_by_punctuation_normalisation(on):
    import hashlib

    fp = fingerprint(PINNED_TEXTS, DedupConfig(normalize_punctuation=on, normalize_digits=on))
    assert fp.keys.tolist() == PINNED_KEYS
    if not on:
        assert hashlib.sha256(fp.sigs.tobytes()).hexdigest() == PINNED_SIGS_PUNCTUATION_KEPT
    # "works." and "works!" are different texts for exact dedup, whatever the option
    a, b = fingerprint(["how a bridge works.", "how a bridge works!"], CFG).keys
    assert a != b


def test_simplify_deletes_punctuation_and_reads_digit_runs_as_zero():
    assert simplify("how a bridge works!") == "how a bridge works"
    assert simplify("call 555-1234 at 3.14 pm, in 2024") == "call 0 at 0 pm in 0"
    assert simplify("¿qué tal? «bien» — dijo…") == "qué tal bien dijo"
    assert simplify("「你好」，世界！123 ٤٥٦") == "你好世界0 0"
    assert simplify("don't stop-me now ...") == "dont stopme now"
    assert simplify("?!") == ""
    assert simplify("call 555-1234, ok", digits=False) == "call 5551234 ok"
    assert simplify("call 555-1234 ١٢", punctuation=False) == "call 0-0 0"
    assert simplify("「你好」123", punctuation=False, digits=False) == "「你好」123"
    assert shingles("?!", CFG) == set()
    assert shingles("A b, c!", CFG) == {"a b c"}
    assert shingles("A b, c!", DedupConfig(normalize_punctuation=False)) == {"a b, c!"}


BRIDGE = "Please explain to a child how a bridge works{}"


def test_the_bridge_pair_is_a_near_duplicate_only_with_punctuation_normalised():
    texts = [BRIDGE.format("."), BRIDGE.format("!"), BRIDGE.format("?")]
    off = DedupConfig(normalize_punctuation=False)
    assert jaccard(shingles(texts[0], off), shingles(texts[1], off)) < off.threshold
    assert jaccard(shingles(texts[0], CFG), shingles(texts[1], CFG)) == 1.0
    fp = fingerprint(texts, CFG)
    assert len(set(fp.keys.tolist())) == 3  # three distinct exact keys ...
    assert len(set(cluster(fp.sigs, CFG, fp.keys, texts).tolist())) == 1  # ... one cluster
    fp_off = fingerprint(texts, off)
    assert len(set(cluster(fp_off.sigs, off, fp_off.keys, texts).tolist())) == 3
    res = deduplicate([{"prompt": t, "completion": "It spreads the load."} for t in texts], CFG)
    assert res.dropped == {"exact_duplicate": 0, "near_duplicate": 2}


def test_short_prompts_retyped_with_other_punctuation_cluster():
    groups = [
        ["What is the capital of France?", "what is the capital of france", "What is the capital of France ?!"],
        ['Translate "good morning" into Spanish.', "Translate good morning into Spanish", "Translate 'good morning' into Spanish!"],
        ["Summarise this: 3 apples, 4 pears.", "Summarise this 3 apples 4 pears"],
        ["¿Cómo estás?", "¡Cómo estás!"],
    ]
    # digits are kept by default: other numbers make another question
    others = ["What is the capital of Spain?", "Translate good evening into Spanish", "Cómo",
              "Summarise this: 12 apples, 7 pears."]
    texts = [t for g in groups for t in g] + others
    fp = fingerprint(texts, CFG)
    cid = cluster(fp.sigs, CFG, fp.keys, texts).tolist()
    at = 0
    seen = set()
    for g in groups:
        ids = set(cid[at : at + len(g)])
        assert len(ids) == 1, g
        seen |= ids
        at += len(g)
    assert len(seen) == len(groups)
    assert not seen & set(cid[at:]) and len(set(cid[at:])) == len(others)
    off = DedupConfig(normalize_punctuation=False)
    fp_off = fingerprint(texts, off)
    assert len(set(cluster(fp_off.sigs, off, fp_off.keys, texts).tolist())) > len(groups) + len(others)
    digits = DedupConfig(normalize_digits=True)  # as datatrove: numbers read as 0
    fp_d = fingerprint(texts, digits)
    cid_d = cluster(fp_d.sigs, digits, fp_d.keys, texts).tolist()
    assert cid_d[texts.index("Summarise this: 12 apples, 7 pears.")] == cid_d[texts.index(
        "Summarise this 3 apples 4 pears")]


def test_signature_agreement_estimates_jaccard():
    rng = random.Random(3)
    errors = []
    for i in range(40):
        base = words(200, 100 + i)
        other = list(base)
        for _ in range(rng.randrange(0, 40)):  # point edits give a spread of similarities
            other[rng.randrange(len(other))] = "zz" + str(rng.randrange(10**6))
        a, b = " ".join(base), " ".join(other)
        sig = signatures([a, b], CFG)
        est = float((sig[0] == sig[1]).mean())
        errors.append(est - jaccard(shingles(a, CFG), shingles(b, CFG)))
    errors = np.array(errors)
    assert abs(errors.mean()) < 0.03  # unbiased
    assert np.abs(errors).max() < 0.2  # within ~4 standard deviations at 128 bins


# -- clustering -----------------------------------------------------------------------------------


def corpus() -> tuple[list[str], list[set[int]]]:
    """Five families of near-duplicates (one edited word in ~100) plus 30 unrelated texts."""
    texts, families = [], []
    for f in range(5):
        base = words(100, 1000 + f)
        members = set()
        for j in range(4):
            edited = list(base)
            edited[(j * 37) % 100] = f"edit{j}"
            members.add(len(texts))
            texts.append(" ".join(edited))
        families.append(members)
    texts += [" ".join(words(100, 5000 + i)) for i in range(30)]
    return texts, families


def test_cluster_groups_near_duplicates_only():
    texts, families = corpus()
    fp = fingerprint(texts, CFG)
    cid = cluster(fp.sigs, CFG, fp.keys)
    for fam in families:
        assert len({cid[i] for i in fam}) == 1
    assert len(np.unique(cid)) == 5 + 30
    # the id is the smallest content key of the members
    for fam in families:
        assert cid[min(fam)] == min(fp.keys[i] for i in fam)


def test_cluster_ids_do_not_depend_on_row_order():
    texts, _ = corpus()
    perm = np.random.default_rng(5).permutation(len(texts))
    fp = fingerprint(texts, CFG)
    fp_p = fingerprint([texts[i] for i in perm], CFG)
    assert np.array_equal(cluster(fp.sigs, CFG, fp.keys)[perm], cluster(fp_p.sigs, CFG, fp_p.keys))


def test_cluster_without_exact_keys_and_switches():
    texts, _families = corpus()
    sigs = signatures(texts, CFG)
    cid = cluster(sigs, CFG)
    assert len(np.unique(cid)) == 35
    exact_only = cluster(sigs, DedupConfig(near=False), fingerprint(texts, CFG).keys)
    assert len(np.unique(exact_only)) == len(texts)
    with pytest.raises(ValueError, match="exact_keys"):
        cluster(sigs, CFG, ["a"])


def test_lsh_params_fit_the_threshold():
    b, r = D.lsh_params(0.8, 128)
    assert b * r <= 128
    p = lambda j: 1 - (1 - j**r) ** b
    assert p(0.8) > 0.85 and p(0.9) > 0.99 and p(0.3) < 0.01


# -- deduplicate: keep rule and report ------------------------------------------------------------


def row(prompt, completion, gt=False, at="2026-01-01T00:00:00Z"):
    return {"prompt": prompt, "completion": completion, "ground_truth": gt, "updated_at": at}


def test_keep_rule_ground_truth_then_latest_then_longest_then_index():
    p = " ".join(words(60, 9))
    rows = [
        row(p, "short answer here", at="2026-03-01T00:00:00Z"),
        row(p, "short answer here", gt=True, at="2026-01-01T00:00:00Z"),
        row(p, "short answer here", at="2026-05-01T00:00:00Z"),
    ]
    res = deduplicate(rows, CFG)
    assert res.keep.tolist() == [False, True, False]
    rows[1]["ground_truth"] = False  # now the latest wins; offsets are compared as instants
    rows[0]["updated_at"] = "2026-05-01T01:00:00+02:00"  # = 2026-04-30T23:00Z, older than row 2
    assert deduplicate(rows, CFG).keep.tolist() == [False, False, True]
    same_time = [row(p, "a b c"), row(p, "a b c d e f g h"), row(p, "a b c d e f g h")]
    cfg = DedupConfig(on="prompt")
    assert deduplicate(same_time, cfg).keep.tolist() == [False, True, False]


def test_deduplicate_counts_reasons_and_examples():
    texts, _families = corpus()
    rows = [row(t, "") for t in texts] + [row(texts[0].upper(), "")]  # + an exact duplicate
    res = deduplicate(rows, DedupConfig(on="prompt"))
    assert res.kept == 35
    assert res.dropped == {"exact_duplicate": 1, "near_duplicate": 15}
    assert res.clusters_removed == 5
    assert res.summary() == {
        "rows": 51,
        "kept": 35,
        "dropped": res.dropped,
        "clusters_removed": 5,
    }
    ex = res.examples[0]
    assert ex["size"] == 5 and len(ex["kept"]["text"]) <= 200
    assert {d["reason"] for d in ex["dropped"]} <= {"exact_duplicate", "near_duplicate"}
    assert all(rows[d["row"]]["prompt"][:50] == d["text"][:50] for d in ex["dropped"])


def test_on_prompt_versus_prompt_response():
    p = " ".join(words(50, 4))
    rows = [row(p, " ".join(words(50, 5))), row(p, " ".join(words(50, 6)))]
    assert deduplicate(rows, DedupConfig(on="prompt")).kept == 1
    assert deduplicate(rows, DedupConfig()).kept == 2


def test_exact_only_and_nothing():
    a = " ".join(words(50, 1))
    b = a.replace(a.split()[10], "changed")
    rows = [row(a, ""), row(a + "  ", ""), row(b, "")]
    assert deduplicate(rows, DedupConfig(near=False)).dropped == {
        "exact_duplicate": 1,
        "near_duplicate": 0,
    }
    assert deduplicate(rows, DedupConfig()).kept == 1
    none = deduplicate(rows, DedupConfig(exact=False, near=False))
    assert none.kept == 3 and none.cluster_id[0] == none.cluster_id[1] != none.cluster_id[2]


@pytest.mark.parametrize(
    "rows, kept",
    [
        ([], 0),
        ([row("only", "one")], 1),
        ([row("Same text", "same")] * 50, 1),
        ([row("", "")] * 3 + [row("x", "")], 2),
        ([row("a b", ""), row("a c", ""), row("b a", "")], 3),  # shorter than n: exact only
    ],
)
def test_edge_cases(rows, kept):
    res = deduplicate(rows, CFG)
    assert res.kept == kept
    assert len(res.cluster_id) == len(rows) and res.cluster_id.dtype == np.int64


def test_fingerprints_can_come_from_shards_and_executor():
    from concurrent.futures import ThreadPoolExecutor

    texts, _ = corpus()
    rows = [row(t, "r") for t in texts]
    fp = Fingerprints.concat(
        [
            fingerprint(
                [dedup_text(r["prompt"], r["completion"], CFG) for r in rows[i : i + 7]], CFG
            )
            for i in range(0, len(rows), 7)
        ]
    )
    direct = deduplicate(rows, CFG)
    with ThreadPoolExecutor(2) as pool:
        pooled = deduplicate(rows, CFG, executor=pool, shard_rows=10)
    for other in (deduplicate(rows, CFG, fingerprints=fp), pooled):
        assert np.array_equal(direct.cluster_id, other.cluster_id)
        assert np.array_equal(direct.keep, other.keep)
    with pytest.raises(ValueError, match="fingerprints cover"):
        deduplicate(rows[:3], CFG, fingerprints=fp)


# -- split ----------------------------------------------------------------------------------------


def test_split_whole_clusters_deterministic_and_leak_free():
    rng = np.random.default_rng(0)
    cids = rng.integers(0, 2**62, size=3000)
    cids = np.repeat(cids, rng.integers(1, 5, size=3000))
    is_eval = split_by_cluster(cids, 0.1, seed="ds-1")
    assert leakage(cids, is_eval) == 0
    assert 0.07 < is_eval.mean() < 0.13
    perm = rng.permutation(len(cids))
    assert np.array_equal(split_by_cluster(cids[perm], 0.1, seed="ds-1"), is_eval[perm])
    assert not np.array_equal(split_by_cluster(cids, 0.1, seed="ds-2"), is_eval)
    assert not split_by_cluster(cids, 0.0).any() and split_by_cluster(cids, 1.0).all()
    with pytest.raises(ValueError):
        split_by_cluster(cids, 1.5)


def test_leakage_counts_straddling_clusters():
    cids = np.array([1, 1, 2, 2, 3])
    assert leakage(cids, np.array([True, False, True, True, False])) == 1
    assert leakage(cids, np.array([False, False, True, True, False])) == 0


# -- real data ------------------------------------------------------------------------------------


def test_t0_near_duplicates_are_real(shared_data):
    """On 8,000 T0 rows, every sampled verified pair is close to the threshold or above."""
    with gzip.open(shared_data / "t0_train_50k.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in islice(f, 8000)]
    texts = [dedup_text(r["prompt"], r["completion"], CFG) for r in rows]
    fp = fingerprint(texts, CFG)
    a, b, _ = D.similar_pairs(fp.sigs, CFG, fp.keys, texts)
    assert len(a) > 500  # the file holds many near-duplicates
    sample = np.random.default_rng(1).choice(len(a), size=300, replace=False)
    true_j = np.array(
        [jaccard(shingles(texts[a[i]], CFG), shingles(texts[b[i]], CFG)) for i in sample]
    )
    assert (true_j >= CFG.threshold).mean() >= 0.97
    assert (true_j >= CFG.threshold - 0.15).all()
    res = deduplicate([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], CFG)
    assert res.dropped["near_duplicate"] > 1000
    assert leakage(res.cluster_id, split_by_cluster(res.cluster_id, 0.1, "t0")) == 0


def test_chinese_rows_dedup_on_character_shingles(shared_data):
    data = json.loads((shared_data / "alpaca_zh_10000.json").read_text(encoding="utf-8"))
    texts = [dedup_text(r["instruction"] + r["input"], r["output"], CFG) for r in data]
    assert np.mean([is_unspaced(normalize(t)) for t in texts]) > 0.9
    rng = random.Random(2)
    originals = [t for t in texts if len(t) > 150][:40]
    edited = []
    for t in originals:  # change three characters: a near-duplicate for a reader
        chars = list(t)
        for _ in range(3):
            chars[rng.randrange(len(chars))] = "某"
        edited.append("".join(chars))
    both = originals + edited
    fp = fingerprint(both, CFG)
    cid = cluster(fp.sigs, CFG, fp.keys, both)
    n = len(originals)
    true_j = [jaccard(shingles(originals[i], CFG), shingles(edited[i], CFG)) for i in range(n)]
    assert np.median(true_j) > 0.7  # character shingles see the edit as small
    merged = np.array([cid[i] == cid[n + i] for i in range(n)])
    above = np.array(true_j) >= CFG.threshold
    assert not merged[~above].any()  # exact check near the threshold: no false merge
    assert merged[above].mean() >= 0.85  # LSH finds most (a pair at J=0.8 has p=0.87)
    res = deduplicate(
        [{"prompt": r["instruction"] + r["input"], "completion": r["output"]} for r in data], CFG
    )
    assert 0 < res.kept <= len(data)
    # the clusters it removes really are similar on character shingles
    for ex in res.examples:
        kept = shingles(texts[ex["kept"]["row"]], CFG)
        for d in ex["dropped"]:
            if d["reason"] == "near_duplicate":
                assert jaccard(kept, shingles(texts[d["row"]], CFG)) > 0.5


def test_exact_jaccard_matches_shingle_sets():
    texts = EDGE_TEXTS + [" ".join(words(80, 11)), " ".join(words(80, 11)[:70] + words(10, 12))]
    rng = np.random.default_rng(4)
    a = rng.integers(0, len(texts), 200)
    b = rng.integers(0, len(texts), 200)
    got = D.exact_jaccard(texts, a, b, CFG)
    want = [jaccard(shingles(texts[i], CFG), shingles(texts[j], CFG)) for i, j in zip(a, b)]
    assert np.allclose(got, want)


def test_estimate_only_mode_still_groups_clear_duplicates():
    texts, _ = corpus()
    rows = [row(t, "") for t in texts]
    res = deduplicate(rows, DedupConfig(on="prompt", verify_margin=0.0))
    assert res.kept == 35 and res.dropped["near_duplicate"] == 15
