"""Ingest throughput on the local stack: the ingest flow against its ceiling and the alternative.

    .venv/bin/python bench/ingest.py [--lines-per-object 3000] [--storage-objects 2]

The 55,185 T0 prompts (``../shared/data/t0_train_50k.jsonl.gz``) are written as JSONL objects
of ``--lines-per-object`` lines into a fresh bucket. Then, each into a fresh project:

(a) ``ingest_prompts`` end to end (a child process against the stack's Prefect server, so its
    peak RSS is measured alone): list, read, parse, normalise, prompt_id, dedupe, import, ledger;
(b) the ceiling: the same tasks (those (a) imported) sent straight through the SDK in 10k batches;
(c) Label Studio's own S3 import storage + sync (what a user would otherwise set up), on the
    first ``--storage-objects`` objects only (its ~120 tasks/s would take minutes for all):
    its rate is measured on that subset and the full-set time extrapolated (labelled so);
(d) (a) again on the unchanged prefix.

(a) and (b) alternate ``--repeat`` times, in alternating order, each project deleted once
measured (Label Studio's import slows as its database grows; the best run of each counts).
Targets: (a) >= 0.75 x (b) (issue #19) and >= 20 x (c); (d) imports 0 in <= 2 s; peak RSS of (a) <= 1 GB.
Prints a table and writes bench/results/ingest.json. Projects and the bucket are removed after.
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

from sftflow.core.settings import get_settings
from sftflow.tasks.adapters.labelstudio import build_labelstudio
from sftflow.tasks.adapters.s3 import build_s3
from sftflow.tasks.ingest.projects import ensure_project
from sftflow.tasks.ingest.prompts import prompt_id

DATA = Path(os.environ.get("SFTFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "bench" / "results" / "ingest.json"
TARGETS = {
    "flow_vs_ceiling_min": 0.75,
    "flow_vs_labelstudio_storage_min": 20.0,
    "rerun_imported": 0,
    "rerun_max_s": 2.0,
    "peak_rss_max_mb": 1024,
}

CHILD = """
import json, sys, time
from sftflow.tasks.adapters.clients import prefect_api
from sftflow.core.settings import get_settings
from sftflow.flows.ingest import IngestParams, ingest_prompts
params = IngestParams(source=sys.argv[1], project=sys.argv[2], batch_size=10_000)
with prefect_api(get_settings()):
    t = time.perf_counter()
    report = ingest_prompts(params)
    wall = time.perf_counter() - t
print("REPORT " + json.dumps({"wall_s": wall, **report.model_dump(mode="json")}))
"""


def run_flow(source: str, project: str) -> tuple[dict, float]:
    """One flow run in a child process: its report and the child's peak RSS in MB."""
    proc = subprocess.run([sys.executable, "-c", CHILD, source, project], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("REPORT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"ingest child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return json.loads(line[len("REPORT "):]), rss_mb


def machine(ls) -> dict:
    import psutil

    try:
        ls_version = ls.versions.get().release
    except Exception:  # noqa: BLE001 - informational only
        ls_version = None
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "label_studio": ls_version, "storage": "SeaweedFS (local)",
        "note": "see the load averages: below ~1 on 2 cores means nothing else was running",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines-per-object", type=int, default=3000)
    ap.add_argument("--storage-objects", type=int, default=1,
                    help="objects synced by Label Studio's S3 storage in (c)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of (a) and of (b); best counts")
    args = ap.parse_args()

    settings = get_settings()
    ls = build_labelstudio(settings.labelstudio)
    bucket = f"bench-ingest-{uuid.uuid4().hex[:8]}"
    s3 = build_s3(settings.s3.model_copy(update={"bucket": bucket}))
    s3.ensure_bucket()
    run = uuid.uuid4().hex[:6]
    projects: list[int] = []
    info = machine(ls)
    try:
        # -- the corpus ------------------------------------------------------------------------
        with gzip.open(DATA / "t0_train_50k.jsonl.gz", "rt", encoding="utf-8") as fh:
            lines = [line for line in fh if line.strip()]
        n = args.lines_per_object
        keys = []
        for i in range(0, len(lines), n):
            keys.append(f"t0/part-{i // n:03d}.jsonl")
            s3.put_bytes(keys[-1], "".join(lines[i:i + n]).encode())
        source = f"s3://{bucket}/t0/"
        print(f"{len(lines):,} prompts in {len(keys)} objects of {n} lines under {source}")

        # -- (a) and (b), alternating: the machine is shared, so each runs --repeat times and
        # the best run of each counts (every run is in the JSON).
        seen: set[str] = set()
        tasks: list[dict] = []
        for i, line in enumerate(lines):
            text = json.loads(line)["prompt"]
            pid = prompt_id(text)
            if pid not in seen:  # the same tasks, with the same data fields, as the flow sends
                seen.add(pid)
                tasks.append({"data": {
                    "prompt": text, "prompt_id": pid, "source": f"s3://{bucket}/{keys[i // n]}",
                    "source_etag": "0" * 32, "source_row": i % n + 1,
                    "ingest_batch": f"{run}-{len(tasks) // 10_000:05d}"}})
        a_runs, b_runs, loads = [], [], []

        def raw(rep: int) -> None:
            proj_b = ensure_project(ls, f"bench-ingest-raw-{run}-{rep}")
            t = time.perf_counter()
            for i in range(0, len(tasks), 10_000):
                ls.projects.import_tasks(
                    id=proj_b.id, request=tasks[i:i + 10_000],
                    request_options={"max_retries": 0, "timeout_in_seconds": 600})
            b_runs.append(time.perf_counter() - t)
            loads.append({"b": rep, "load_avg_1m": round(os.getloadavg()[0], 2)})
            print(f"(b) raw SDK import: {len(tasks):,} tasks in {b_runs[-1]:.1f} s")
            ls.projects.delete(id=proj_b.id)

        def flow(rep: int) -> float:
            a, rss_mb = run_flow(source, f"bench-ingest-flow-{run}-{rep}")
            a_runs.append(a)
            loads.append({"a": rep, "load_avg_1m": round(os.getloadavg()[0], 2)})
            print(f"(a) flow: {a['records']:,} prompts, {a['imported']:,} imported in "
                  f"{a['wall_s']:.1f} s; phases {a['seconds']}; peak RSS {rss_mb:.0f} MB")
            if rep < args.repeat - 1:  # the last one stays, for the rerun (d)
                ls.projects.delete(id=a["project_id"])
            else:
                projects.append(a["project_id"])
            return rss_mb

        # Label Studio's import slows as its database grows: each project is deleted once
        # measured, and the order alternates, so that neither side always meets a larger one.
        for rep in range(args.repeat):
            if rep % 2 == 0:
                raw(rep)
                rss_mb = flow(rep)
            else:
                rss_mb = flow(rep)
                raw(rep)
        tasks.clear()  # free them before (c)
        a = min(a_runs, key=lambda r: r["wall_s"])
        b_s = min(b_runs)
        a_prompts_s = a["records"] / a["wall_s"]
        a_imported_s = a["imported"] / a["wall_s"]
        b_rate = len(seen) / b_s

        # -- (c) Label Studio's S3 import storage, on a subset -----------------------------------
        subset = keys[: args.storage_objects]
        proj_c = ensure_project(ls, f"bench-ingest-lsstorage-{run}")
        projects.append(proj_c.id)
        regex = "|".join(k.rsplit("/", 1)[-1].replace(".", r"\.") for k in subset)
        storage = ls.import_storage.s3.create(
            project=proj_c.id, bucket=bucket, prefix="t0/", regex_filter=f"^.*({regex})$",
            use_blob_urls=False, recursive_scan=True, region_name=settings.s3.region,
            s3endpoint=settings.s3.endpoint_url,
            aws_access_key_id=settings.s3.access_key_id.get_secret_value(),
            aws_secret_access_key=settings.s3.secret_access_key.get_secret_value(),
            title="bench", presign=False,
        )
        # A sync can fail midway ("database is locked" when others write to Label Studio's
        # SQLite at the same time); a user would sync again, which skips tasks already there.
        t = time.perf_counter()
        c_attempts, c_failures = 0, []
        while c_attempts < 5:
            c_attempts += 1
            ls.import_storage.s3.sync(id=storage.id, request_options={"timeout_in_seconds": 1800})
            for _ in range(3600):  # with no Redis the sync runs inside the request; poll anyway
                st = ls.import_storage.s3.get(id=storage.id)
                if str(st.status) in ("completed", "failed"):
                    break
                time.sleep(0.5)
            if str(st.status) == "completed":
                break
            c_failures.append(str(getattr(st, "traceback", "") or "")[-300:])
        c_s = time.perf_counter() - t
        c_status = str(st.status)
        c_meta = {k: v for k, v in (st.meta or {}).items() if k in ("duration", "tasks_existed")}
        c_tasks = int(ls.projects.get(id=proj_c.id).task_number or 0)
        c_rate = c_tasks / c_s if c_s else 0.0
        c_expected = min(n * len(subset), len(lines))
        print(f"(c) Label Studio S3 storage sync ({len(subset)} objects): {c_tasks:,} tasks "
              f"in {c_s:.1f} s, status {c_status} after {c_attempts} sync(s)")

        # -- (d) rerun on the unchanged prefix -------------------------------------------------
        d, rss_d = run_flow(source, f"bench-ingest-flow-{run}-{args.repeat - 1}")
        print(f"(d) rerun: {d['imported']} imported, {d['files_unchanged']} objects unchanged, "
              f"{d['wall_s']:.2f} s")

        met = {
            "flow_vs_ceiling": a_prompts_s >= TARGETS["flow_vs_ceiling_min"] * b_rate,
            "flow_vs_ceiling_imported_only": a_imported_s >= TARGETS["flow_vs_ceiling_min"] * b_rate,
            "flow_vs_labelstudio_storage":
                a_prompts_s >= TARGETS["flow_vs_labelstudio_storage_min"] * c_rate,
            "rerun_imports_nothing": d["imported"] == TARGETS["rerun_imported"],
            "rerun_time": d["wall_s"] <= TARGETS["rerun_max_s"],
            "peak_rss": max(rss_mb, rss_d) <= TARGETS["peak_rss_max_mb"],
        }
        rows = [
            ("(a) ingest flow, end to end", f"{a['records']:,} prompts", f"{a['wall_s']:.1f}",
             f"{a_prompts_s:,.0f} prompts/s ({a_imported_s:,.0f} imported/s)"),
            ("(b) ceiling: raw SDK import, 10k batches", f"{len(seen):,} tasks", f"{b_s:.1f}",
             f"{b_rate:,.0f} tasks/s"),
            ("(c) Label Studio S3 storage sync (subset)",
             f"{c_tasks:,} of {c_expected:,} tasks", f"{c_s:.1f}",
             f"{c_rate:,.0f} tasks/s (all {len(lines):,}: ~{len(lines) / c_rate:,.0f} s, "
             "extrapolated)" if c_rate else "n/a"),
            ("(d) rerun, unchanged prefix", f"{d['imported']} imported", f"{d['wall_s']:.2f}",
             f"{d['files_unchanged']} objects skipped"),
        ]
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        print()
        print(" | ".join(h.ljust(w[i]) for i, h in enumerate(("run", "volume", "s", "rate"))))
        for r in rows:
            print(" | ".join(c.ljust(w[i]) for i, c in enumerate(r)))
        print(f"\n(a)/(b) = {a_prompts_s / b_rate:.2f} (imported only: {a_imported_s / b_rate:.2f}), "
              f"(a)/(c) = {a_prompts_s / c_rate:.1f}x, peak RSS {max(rss_mb, rss_d):.0f} MB")
        print("targets met: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in met.items()))

        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({
            "machine": {**info, "load_after_each_run": loads}, "targets": TARGETS, "met": met,
            "corpus": {"prompts": len(lines), "objects": len(keys), "lines_per_object": n,
                       "distinct_prompt_ids": len(seen)},
            "a_flow": {"wall_s": round(a["wall_s"], 2), "prompts_per_s": round(a_prompts_s, 1),
                       "imported_per_s": round(a_imported_s, 1), "peak_rss_mb": round(rss_mb),
                       "all_runs_wall_s": [round(r["wall_s"], 2) for r in a_runs],
                       "report": a},
            "b_raw_sdk": {"tasks": len(seen), "seconds": round(b_s, 2),
                          "tasks_per_s": round(b_rate, 1), "batch": 10_000,
                          "all_runs_s": [round(x, 2) for x in b_runs]},
            "c_labelstudio_s3_storage": {"objects": len(subset), "tasks": c_tasks,
                                         "seconds": round(c_s, 2), "tasks_per_s": round(c_rate, 1),
                                         "status": c_status, "meta": c_meta, "subset": True,
                                         "tasks_expected": c_expected,
                                         "syncs": c_attempts, "failures": c_failures,
                                         "full_set_seconds_extrapolated":
                                             round(len(lines) / c_rate, 1) if c_rate else None},
            "d_rerun": {"wall_s": round(d["wall_s"], 3), "imported": d["imported"],
                        "files_unchanged": d["files_unchanged"], "peak_rss_mb": round(rss_d),
                        "report": d},
            "ratios": {"a_over_b": round(a_prompts_s / b_rate, 3),
                       "a_imported_over_b": round(a_imported_s / b_rate, 3),
                       "a_over_c": round(a_prompts_s / c_rate, 1) if c_rate else None},
        }, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    finally:
        for pid in projects:
            try:
                ls.projects.delete(id=pid)
            except Exception as err:  # noqa: BLE001 - cleanup only
                print(f"could not delete project {pid}: {err}", file=sys.stderr)
        s3.delete(o.key for o in s3.list(""))
        try:
            s3.client.delete_bucket(Bucket=bucket)
        except Exception as err:  # noqa: BLE001 - cleanup only
            print(f"could not delete bucket {bucket}: {err}", file=sys.stderr)


if __name__ == "__main__":
    main()
