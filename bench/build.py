"""Benchmark: 55k annotated Label Studio tasks -> a committed dataset version, then 1 % more.

Side by side, on the same project, each build in its own process (peak RSS is that
process's ``ru_maxrss``):

* **sftflow**: the ``build_dataset`` flow (export snapshot, streaming parse, filters, dedup,
  split, content-addressed shards, manifest, CAS ref) against the stack's Prefect server.
* **naive**: the same export snapshot held in memory and loaded with ``json.loads``, the same
  filters and dedup, and a full copy of the data per version (one Parquet file + OpenAI + TRL
  JSONL, as most ad-hoc scripts do).

Targets (issue 4): first version <= 90 s and peak RSS <= 1.5 GB; a second version after 1 %
new annotations writes <= 10 % of the first's bytes.

Run: ``.venv/bin/python bench/build.py`` (needs the local stack and ../shared/data).
Writes ``bench/results/build.json``. Importing the tasks (about 75 s) is not part of a target.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("SFTFLOW_SHARED_DATA", ROOT.parent / "shared" / "data")) / "t0_train_50k.jsonl.gz"
RESULTS = ROOT / "bench" / "results" / "build.json"
TARGETS = {"first_version_s": 90.0, "peak_rss_mb": 1536.0, "second_bytes_ratio": 0.10}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- children ------------------------------------------------------------------------------------
def child_sftflow(project: str, dataset: str) -> dict:
    from sftflow.core.settings import get_settings
    from sftflow.flows.build_dataset import BuildParams, build_dataset
    from sftflow.tasks.adapters.clients import prefect_api

    with prefect_api(get_settings()):
        t0 = time.perf_counter()
        report = build_dataset(BuildParams(project=project, dataset=dataset))
        elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "version": report.version, "rows": report.rows,
            "bytes_written": report.bytes_written, "bytes_total": report.bytes_total,
            "counts": report.counts}


def child_naive(project_id: int, dataset: str, version: int) -> dict:
    """The usual script: whole export in memory + json.loads, same filters/dedup, and a full
    copy per version. (It takes the same export snapshot: the synchronous export endpoint was
    not benchmarked at 55k tasks on the shared stack.)"""
    import numpy as np

    from sftflow.tasks import dedup
    from sftflow.tasks.adapters.clients import Clients
    from sftflow.tasks.build.export import create_snapshot, delete_snapshot, parse_tasks
    from sftflow.tasks.build.filters import FilterConfig, filter_rows
    from sftflow.tasks.versions import formats

    clients = Clients()
    t0 = time.perf_counter()
    snap = create_snapshot(clients.labelstudio, project_id)
    body = b"".join(clients.labelstudio.projects.exports.download(
        id=project_id, export_pk=snap.export_id, export_type="JSON"))
    delete_snapshot(clients.labelstudio, snap)
    t_export = time.perf_counter() - t0
    tasks = json.loads(body)
    del body
    parsed = parse_tasks(tasks, "latest")
    del tasks
    rows = filter_rows(parsed.rows, FilterConfig()).kept
    cfg = dedup.DedupConfig()
    res = dedup.deduplicate(rows, cfg)
    kept = [rows[i] for i in np.flatnonzero(res.keep)]
    is_eval = dedup.split_by_cluster(res.cluster_id[res.keep], 0.1, 0)
    for r, cid, ev in zip(kept, res.cluster_id[res.keep].tolist(), is_eval.tolist(), strict=True):
        r["cluster_id"], r["split"] = f"{cid & 0xFFFFFFFFFFFFFFFF:016x}", "eval" if ev else "train"
        r["row_hash"] = formats.row_hash(r)
    s3 = clients.s3
    written = 0
    prefix = f"bench-naive/{dataset}/v{version}"
    for split in ("train", "eval"):
        part = [r for r in kept if r["split"] == split]
        for name, data in ((f"{split}.parquet", formats.parquet_bytes(part)),
                           (f"openai/{split}.jsonl", formats.openai_chat_jsonl(part)),
                           (f"trl/{split}.jsonl", formats.trl_jsonl(part))):
            s3.put_bytes(f"{prefix}/{name}", data)
            written += len(data)
    return {"seconds": time.perf_counter() - t0, "export_seconds": t_export,
            "rows": {"train": int((~is_eval).sum()), "eval": int(is_eval.sum())},
            "bytes_written": written, "bytes_total": written}


def run_child(*args: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *args], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
                "process_seconds": time.perf_counter() - t0}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t0
    return out


# -- parent --------------------------------------------------------------------------------------
def load_rows(limit: int | None) -> list[dict]:
    rows = []
    with gzip.open(DATA, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            rows.append({"prompt": rec["prompt"], "completion": rec["completion"]})
            if limit and len(rows) >= limit:
                break
    return rows


def as_task(row: dict) -> dict:
    return {"data": {"prompt": row["prompt"]}, "annotations": [{
        "result": [{"from_name": "instruction", "to_name": "prompt", "type": "textarea",
                    "value": {"text": [row["completion"]]}}],
        "was_cancelled": False, "ground_truth": False}]}


def import_tasks(ls, project_id: int, rows: list[dict]) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(rows), 1000):
        ls.projects.import_tasks(id=project_id, request=[as_task(r) for r in rows[i:i + 1000]],
                                 return_task_ids=False)
    return time.perf_counter() - t0


def machine() -> dict:
    import psutil

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_1m": os.getloadavg()[0],
            "note": "see load_avg_1m: below ~1 on 2 cores means nothing else was running"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=None, help="Use the first N rows (default all).")
    ap.add_argument("--new-fraction", type=float, default=0.01)
    ap.add_argument("--keep", action="store_true", help="Keep the project and the S3 objects.")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        out = (child_sftflow(rest[0], rest[1]) if kind == "sftflow"
               else child_naive(int(rest[0]), rest[1], int(rest[2])))
        out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        print(json.dumps(out, default=str))
        return

    from sftflow.tasks.adapters.clients import Clients
    from sftflow.tasks.ingest.projects import ensure_project

    clients = Clients()
    ls, s3 = clients.labelstudio, clients.s3
    rows = load_rows(args.rows)
    n_new = max(1, round(len(rows) * args.new_fraction))
    first, extra = rows[: len(rows) - n_new], rows[len(rows) - n_new:]
    title = f"bench-build-{uuid.uuid4().hex[:8]}"
    dataset = title
    project = ensure_project(ls, title)
    result: dict = {"benchmark": "build", "machine": machine(), "targets": TARGETS,
                    "rows_total": len(rows), "rows_first": len(first), "rows_new": len(extra)}
    try:
        print(f"importing {len(first):,} annotated tasks into {title} ...", flush=True)
        result["import_first_s"] = round(import_tasks(ls, project.id, first), 1)
        runs: dict = {}
        print("version 1: sftflow ...", flush=True)
        runs["sftflow_v1"] = run_child("sftflow", title, dataset)
        print("version 1: naive ...", flush=True)
        runs["naive_v1"] = run_child("naive", str(project.id), dataset, "1")
        print(f"importing {len(extra):,} new annotated tasks ...", flush=True)
        result["import_new_s"] = round(import_tasks(ls, project.id, extra), 1)
        print("version 2: sftflow ...", flush=True)
        runs["sftflow_v2"] = run_child("sftflow", title, dataset)
        print("version 2: naive ...", flush=True)
        runs["naive_v2"] = run_child("naive", str(project.id), dataset, "2")
        result["runs"] = runs
    finally:
        if not args.keep:
            try:
                ls.projects.delete(id=project.id)
            except Exception as err:  # noqa: BLE001 - report, still clean S3
                print(f"could not delete project {project.id}: {err}")
            s3.delete(o.key for o in s3.list(f"{clients.settings.datasets.prefix}/{dataset}/"))
            s3.delete(o.key for o in s3.list(f"bench-naive/{dataset}/"))

    def ratio(kind: str) -> float | None:
        a, b = runs.get(f"{kind}_v1", {}), runs.get(f"{kind}_v2", {})
        if not a.get("bytes_written") or "bytes_written" not in b:
            return None
        return round(b["bytes_written"] / a["bytes_written"], 4)

    s1 = runs["sftflow_v1"]
    result["met"] = {
        "first_version_s": s1.get("seconds", 1e9) <= TARGETS["first_version_s"],
        "peak_rss_mb": max(runs["sftflow_v1"].get("peak_rss_mb", 1e9),
                           runs["sftflow_v2"].get("peak_rss_mb", 1e9)) <= TARGETS["peak_rss_mb"],
        "second_bytes_ratio": (ratio("sftflow") or 1e9) <= TARGETS["second_bytes_ratio"],
    }
    result["second_bytes_ratio"] = {"sftflow": ratio("sftflow"), "naive": ratio("naive")}

    header = f"{'run':<12}{'seconds':>9}{'process s':>11}{'peak RSS MB':>13}{'rows':>16}{'bytes written':>16}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in runs.items():
        if "error" in r:
            print(f"{name:<12} error: {r['error']}")
            continue
        rows_s = f"{r['rows'].get('train', 0)}/{r['rows'].get('eval', 0)}"
        print(f"{name:<12}{r['seconds']:>9.1f}{r['process_seconds']:>11.1f}{r['peak_rss_mb']:>13.0f}"
              f"{rows_s:>16}{r['bytes_written']:>16,}")
    print(f"\nsecond version / first version bytes: {result['second_bytes_ratio']}")
    print(f"targets {TARGETS}\nmet {result['met']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
