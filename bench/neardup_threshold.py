"""Which threshold should ingest use to stop near-duplicate prompts? Measured on shared data.

    .venv/bin/python bench/neardup_threshold.py [--rows N]

Ingest's own check (``tasks.ingest.index``: ``prompt_config(t)``, the prompts arriving in files
of 5,000, each checked against the index and against the earlier prompts of its file) runs over
the distinct prompts (by prompt_id) of:

* T0 (``t0_train_50k.jsonl.gz``): 294 templates over shared source texts. A caught prompt whose
  match came from the *same template* is the same instruction on (nearly) the same input: a
  near-duplicate. One matched to *another template* is another instruction on the same source
  text: another task for annotators, so a false hit.
* the human-written prompts (``seed_tasks.jsonl`` instructions + inputs, and
  ``user_oriented/instructions.jsonl``): distinct prompts by construction; every catch is a
  false hit.

For each threshold: prompts caught, and the share of them whose exact Jaccard (of the same
shingles) reaches the threshold (the estimate's precision). Recall on retyped prompts: each
human-written prompt is retyped (a) with other punctuation (every ASCII punctuation mark
dropped, a "?" added), (b) with one word in its middle replaced, and the copies are checked
against an index of the originals. Writes
bench/results/neardup_threshold.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sftflow.tasks.dedup import fingerprint, shingles
from sftflow.tasks.ingest.index import SignatureIndex, prompt_config
from sftflow.tasks.ingest.prompts import prompt_id

DATA = Path(os.environ.get("SFTFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
THRESHOLDS = [0.7, 0.8, 0.85, 0.9, 0.95, 1.0]


def distinct(rows: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    seen, out = set(), []
    for text, tag in rows:
        pid = prompt_id(text)
        if pid not in seen:
            seen.add(pid)
            out.append((pid, text, tag))
    return out


def run(prompts: list[tuple[str, str, str]], threshold: float, file_rows: int = 5000) -> dict:
    cfg = prompt_config(threshold)
    index = SignatureIndex(cfg)
    by_id = {pid: (text, tag) for pid, text, tag in prompts}
    caught = same_tag = exact_ok = 0
    for start in range(0, len(prompts), file_rows):
        part = prompts[start : start + file_rows]
        ids = [p for p, _, _ in part]
        sigs = fingerprint([t for _, t, _ in part], cfg).sigs
        matches = index.check(ids, sigs)
        keep = [i for i, m in enumerate(matches) if m is None]
        index.add([ids[i] for i in keep], sigs[keep])
        for (_, text, tag), m in zip(part, matches, strict=True):
            if m is None:
                continue
            caught += 1
            other_text, other_tag = by_id[m.prompt_id]
            same_tag += tag == other_tag
            a, b = shingles(text, cfg), shingles(other_text, cfg)
            exact_ok += len(a & b) / len(a | b) >= threshold - 1e-9
    return {"threshold": threshold, "prompts": len(prompts), "caught": caught,
            "caught_share": round(caught / len(prompts), 4),
            "caught_same_template": same_tag,
            "caught_other_template": caught - same_tag,
            "exact_jaccard_reaches_threshold": round(exact_ok / caught, 4) if caught else None}


def retyped(prompts: list[tuple[str, str, str]], threshold: float) -> dict:
    cfg = prompt_config(threshold)
    index = SignatureIndex(cfg)
    index.add([p for p, _, _ in prompts], fingerprint([t for _, t, _ in prompts], cfg).sigs)
    out = {"threshold": threshold}
    table = str.maketrans("", "", string.punctuation)
    for kind in ("punctuation", "one_word"):
        copies = []
        for _, text, _ in prompts:
            if kind == "punctuation":
                copies.append(text.translate(table) + "?")
            else:
                words = text.split()
                words[len(words) // 2] = "thing"
                copies.append(" ".join(words))
        matches = index.check([prompt_id(c) for c in copies], fingerprint(copies, cfg).sigs)
        out[f"caught_{kind}"] = round(sum(m is not None for m in matches) / len(copies), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=0, help="use the first N T0 rows (0 = all)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "neardup_threshold.json")
    args = ap.parse_args()
    with gzip.open(DATA / "t0_train_50k.jsonl.gz", "rt", encoding="utf-8") as f:
        t0 = [json.loads(line) for line in f]
    if args.rows:
        t0 = t0[: args.rows]
    human = []
    for line in (DATA / "seed_tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        for inst in task["instances"]:
            text = task["instruction"] + ("\n\n" + inst["input"] if inst["input"] else "")
            human.append((text, "seed"))
    for line in (DATA / "user_oriented" / "instructions.jsonl").read_text().splitlines():
        task = json.loads(line)
        for inst in task["instances"]:
            text = task["instruction"] + ("\n\n" + inst["input"] if inst["input"] else "")
            human.append((text, "user"))
    sets = {"t0": distinct([(r["prompt"], r["template"]) for r in t0]), "human": distinct(human)}
    results = {name: [run(p, t) for t in THRESHOLDS] for name, p in sets.items()}
    results["human_retyped"] = [retyped(sets["human"], t) for t in THRESHOLDS]
    print("retyped human prompts caught (punctuation / one word):")
    for r in results["human_retyped"]:
        print(f"  {r['threshold']}: {r['caught_punctuation']:.3f} / {r['caught_one_word']:.3f}")
    for name in ("t0", "human"):
        rows = results[name]
        print(f"{name}: {rows[0]['prompts']} distinct prompts")
        print("| threshold | caught | share | same template | other template | exact J >= t |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['threshold']} | {r['caught']} | {r['caught_share']:.3f} | "
                  f"{r['caught_same_template']} | {r['caught_other_template']} | "
                  f"{r['exact_jaccard_reaches_threshold']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"load_avg_1m": __import__("os").getloadavg()[0],
               "note": "counts of prompts caught, not timings: load does not change them"}
    args.out.write_text(json.dumps({"benchmark": "neardup_threshold", "machine": machine,
                                    "results": results},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
