"""Benchmark: sftflow on projects of 55k, 150k and 300k annotated tasks (issue #21).

For each size N, on the local stack (run it on the PostgreSQL profile: ``sftflow stack up
--postgres``), each step in a child process of its own (its peak RSS is that process's
``ru_maxrss``) against the stack's Prefect server:

1. **ingest**: N prompts as JSONL objects of 5,000 lines in a fresh bucket, ``ingest_prompts``
   into a fresh project (list, parse, dedupe, near-duplicate index, import, ledger);
2. **scratch**: N tasks, each with its annotation, imported through the SDK into another
   project; the first version of a dataset on it (a full export snapshot, every row);
3. **incremental**: +1 % changes (new prompts, near-duplicates, edited annotations, one
   deleted task, as in ``bench/incremental.py``), then the default build (``mode=auto``);
4. **full**: ``--full`` on the same project (a whole export snapshot again): the same version
   id as (3) is expected and recorded;
5. **load_dataset**: ``sftflow.load_dataset`` of that version (every shard verified).

Each step records wall seconds, peak RSS and bytes written (the objects the step added to the
bucket). Then each figure is fitted as a power of N (least squares on log-log), projected to
1M and 10M tasks, and compared with what runs out: the machine's memory, the export deadline
(``tasks/build/export.export_deadline``), and the disk. The first limit met is named.

The shared corpus holds 55,185 real rows; past that, row k joins two real rows chosen by a
seeded generator: the first half of one's prompt (cut at a space) before the second half of
the other's, and the same for the completions. Every row stays real text, distinct, and about
as long as the corpus's rows (session 13 joined them whole: rows past 55k were twice as long,
which bent every fit upwards).

Run (quiet machine; hours at 300k): ``.venv/bin/python bench/scale.py [--sizes 55000,150000,300000]``.
Sizes already in ``bench/results/scale.json`` and not asked for again are kept (each with its
own load average and date). Writes ``bench/results/scale.json`` and ``scale.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.build import _peak_rss_mb, import_tasks, load_rows, machine
from bench.incremental import mixed_changes

RESULTS = ROOT / "bench" / "results" / "scale.json"
STEPS = ("ingest", "scratch", "incremental", "full", "load_dataset")
TARGETS = {"peak_rss_mb_scratch_300k": 2048.0, "incremental_s_300k": 10.0}
PROJECT_TO = (1_000_000, 10_000_000)
LINES_PER_OBJECT = 5000


# -- the corpus ------------------------------------------------------------------------------
def corpus(n: int, seed: int = 21) -> list[dict]:
    """``n`` rows: the shared corpus's, then rows joining two of them (see the docstring)."""
    real = load_rows(None)
    rows = real[:n]
    rng = random.Random(seed)
    while len(rows) < n:
        a, b = rng.sample(real, 2)
        rows.append({"prompt": _halves(a["prompt"], b["prompt"]),
                     "completion": _halves(a["completion"], b["completion"])})
    return rows


def _halves(a: str, b: str) -> str:
    """The first half of ``a`` and the second half of ``b``, each cut at a space near its
    middle (at the middle when there is none), joined by a space."""
    def cut(t: str) -> int:
        mid = len(t) // 2
        at = t.rfind(" ", 0, mid + 1)
        return at if at > 0 else mid
    return f"{a[:cut(a)].rstrip()} {b[cut(b):].lstrip()}"


# -- children: one step each, their peak RSS alone --------------------------------------------
def _child(step: str, args: list[str]) -> dict:
    from sftflow.core.settings import get_settings
    from sftflow.tasks.adapters.clients import prefect_api

    settings = get_settings()
    t0 = time.perf_counter()
    if step == "ingest":
        from sftflow.flows.ingest import IngestParams, ingest_prompts

        with prefect_api(settings):
            report = ingest_prompts(IngestParams(source=args[0], project=args[1], batch_size=10_000))
        out = {"imported": report.imported, "duplicate": report.duplicate,
               "quarantined": report.quarantined, "phase_seconds": report.seconds}
    elif step == "load_dataset":
        import sftflow

        dd = sftflow.load_dataset(args[0], args[1])
        out = {"rows": {k: len(v) for k, v in dd.items()}}
    else:
        from sftflow.flows.build_dataset import BuildParams, build_dataset

        with prefect_api(settings):
            r = build_dataset(BuildParams(project=args[0], dataset=args[1], mode=args[2]))
        out = {"version": r.version, "mode": r.mode, "mode_reason": r.mode_reason, "rows": r.rows,
               "bytes_written": r.bytes_written, "bytes_total": r.bytes_total,
               "stage_seconds": r.seconds, "changes": r.counts.get("changes", {})}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


class StepFailed(RuntimeError):
    """A step's child failed: recorded with the size, the later steps that need it skipped."""


def step(name: str, *args: str) -> dict:
    # the periodic full export (every 20th build by default) would blur the incremental step
    env = {**os.environ, "SFTFLOW_DATASETS__FULL_EVERY": "1000"}
    proc = subprocess.run([sys.executable, __file__, "--child", name, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False, timeout=6 * 3600)
    if proc.returncode != 0:
        raise StepFailed(f"{name} {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {name}: {out['seconds']:.1f} s, peak RSS {out['peak_rss_mb']:.0f} MB", flush=True)
    return out


def _bucket_bytes(s3, prefix: str = "") -> int:
    return sum(o.size for o in s3.list(prefix))


# -- one size ----------------------------------------------------------------------------------
def measure_size(n: int, keep: bool) -> dict:
    """Every step of one size, each project and bucket removed after unless ``keep``."""
    from sftflow.core.settings import get_settings
    from sftflow.tasks.adapters.clients import Clients
    from sftflow.tasks.ingest.projects import ensure_project

    settings = get_settings()
    clients = Clients(settings)
    ls, s3 = clients.labelstudio, clients.s3
    tag = uuid.uuid4().hex[:8]
    rows = corpus(n + max(1, n // 100))
    base, spare = rows[:n], rows[n:]
    out: dict = {"tasks": n, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    projects: list[int] = []
    ingest_bucket = f"bench-scale-{tag}"
    title, dataset = f"bench-scale-{n // 1000}k-{tag}", f"bench-scale-{tag}"
    try:
        out["ingest"] = _ingest(n, base, ingest_bucket, f"bench-scale-ingest-{tag}", projects)
        project = ensure_project(ls, title)
        projects.append(project.id)
        out["import_s"] = round(import_tasks(ls, project.id, base), 1)
        _builds(out, ls, project.id, title, dataset, base, spare)
        out["load_dataset"] = step("load_dataset", dataset, out["full"]["version"])
        out["same_version"] = out["incremental"]["version"] == out["full"]["version"]
    except StepFailed as err:  # what Label Studio or sftflow could not do at this size: kept
        out["failed"] = str(err)[-4000:]
        print(f"  {out['failed'][:300]}", flush=True)
    finally:
        if not keep:
            s3.delete(o.key for o in s3.list(f"{settings.datasets.prefix.strip('/')}/{dataset}/"))
            _clean(clients, projects, ingest_bucket)
    out["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _ingest(n: int, base: list[dict], bucket: str, project: str, projects: list[int]) -> dict:
    from sftflow.core.settings import get_settings
    from sftflow.tasks.adapters.s3 import build_s3

    s3 = build_s3(get_settings().s3.model_copy(update={"bucket": bucket}))
    s3.ensure_bucket()
    for i in range(0, n, LINES_PER_OBJECT):
        lines = "".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in base[i:i + LINES_PER_OBJECT])
        s3.put_bytes(f"prompts/part-{i // LINES_PER_OBJECT:04d}.jsonl", lines.encode())
    before = _bucket_bytes(s3)
    out = step("ingest", f"s3://{bucket}/prompts/", project)
    out["bytes_written"] = _bucket_bytes(s3) - before  # the ledger and the near-duplicate index
    from sftflow.tasks.adapters.clients import Clients

    found = Clients(get_settings()).labelstudio.projects.list(title=project)
    projects += [p.id for p in found if p.title == project]
    return out


def _builds(out: dict, ls, project_id: int, title: str, dataset: str, base: list[dict],
            spare: list[dict]) -> None:
    """Scratch, +1 %, incremental, full: each into ``out`` as it ends (a failure keeps those before)."""
    out["scratch"] = step("build", title, dataset, "auto")
    out["changes"] = mixed_changes(ls, project_id, base, spare, len(spare), random.Random(7))
    out["incremental"] = step("build", title, dataset, "auto")
    out["full"] = step("build", title, dataset, "full")


def _clean(clients, projects: list[int], bucket: str) -> None:
    from sftflow.core.settings import get_settings
    from sftflow.tasks.adapters.s3 import build_s3

    for pid in projects:
        try:
            clients.labelstudio.projects.delete(id=pid)
        except Exception as err:  # noqa: BLE001 - cleanup: say so, go on
            print(f"  could not delete project {pid}: {err}", flush=True)
    s3 = build_s3(get_settings().s3.model_copy(update={"bucket": bucket}))
    s3.delete(o.key for o in s3.list(""))
    try:
        s3.client.delete_bucket(Bucket=bucket)
    except Exception as err:  # noqa: BLE001
        print(f"  could not delete bucket {bucket}: {err}", flush=True)


# -- fits and projections ------------------------------------------------------------------------
def figures(size: dict) -> dict[str, float]:
    """The fitted figures of one size: seconds and peak RSS of each step, bytes written."""
    f: dict[str, float] = {}
    for s in STEPS:
        if s in size:
            f[f"{s}_s"] = size[s]["seconds"]
            f[f"{s}_peak_rss_mb"] = size[s]["peak_rss_mb"]
    for s in ("ingest", "scratch"):
        if s in size:
            f[f"{s}_bytes"] = size[s]["bytes_written"]
    if "scratch" in size:  # the first version's export snapshot: every task, as --full reads
        f["export_s"] = size["scratch"]["stage_seconds"].get("export", 0.0)
    return f


def power_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """``y = c * x**k`` by least squares on logs (``linear_fit`` of log y on log x):
    ``(c, k)``; None with under two points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    fit = linear_fit([p[0] for p in pts], [p[1] for p in pts])
    return None if fit is None else (math.exp(fit[0]), fit[1])


def fit_all(sizes: dict[str, dict]) -> dict:
    """Each figure fitted over the measured sizes and projected to ``PROJECT_TO``."""
    ns = sorted(int(k) for k in sizes)
    per = {n: figures(sizes[str(n)]) for n in ns}
    out: dict = {}
    for name in sorted(set().union(*per.values())):
        have = [n for n in ns if name in per[n]]  # a size whose step failed has no figure
        fit = power_fit([float(n) for n in have], [per[n][name] for n in have])
        if fit is not None:
            c, k = fit
            out[name] = {"coefficient": c, "exponent": round(k, 3),
                         "projected": {str(p): round(c * p ** k, 1) for p in PROJECT_TO}}
    return out


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """``y = a + b * x`` by least squares: ``(a, b)``; None with under two points."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def memory_lines(sizes: dict[str, dict], memory_gb: float) -> dict:
    """Each step's peak RSS as a fixed part (the imports: ~0.5 GB) plus a part per task, and
    where that line passes the machine's memory. A power fit bends under the fixed part (its
    exponent comes out below 1) and so projects memory running out too late."""
    ns = sorted(int(k) for k in sizes)
    per = {n: figures(sizes[str(n)]) for n in ns}
    out: dict = {}
    for s in STEPS:
        have = [n for n in ns if f"{s}_peak_rss_mb" in per[n]]
        fit = linear_fit([float(n) for n in have], [per[n][f"{s}_peak_rss_mb"] for n in have])
        if fit is None or fit[1] <= 0:
            continue
        a, b = fit
        out[s] = {"fixed_mb": round(a), "mb_per_1k_tasks": round(b * 1000, 2),
                  "projected_mb": {str(p): round(a + b * p) for p in PROJECT_TO},
                  "runs_out_at_tasks": int((memory_gb * 1024 - a) / b)}
    return out


def _runs_out(c: float, k: float, limit) -> int | None:
    """The smallest N (10k to 100M, 20 steps a decade) where ``c * N**k`` passes ``limit(N)``."""
    grid = [int(10 ** (4 + i / 20)) for i in range(81)]
    return next((n for n in grid if c * n ** k > limit(n)), None)


def limits(fits: dict, memory_gb: float, disk_free_gb: float) -> list[dict]:
    """Where each resource runs out, by the fits: the smallest N first."""
    from sftflow.tasks.build.export import export_deadline

    found = []
    for name, f in fits.items():
        c, k = f["coefficient"], f["exponent"]
        if name.endswith("_peak_rss_mb"):
            what, n = f"the machine's {memory_gb:.0f} GB of memory", _runs_out(c, k, lambda _: memory_gb * 1024)
        elif name == "scratch_bytes":
            what, n = f"{disk_free_gb:.0f} GB of free disk", _runs_out(c, k, lambda _: disk_free_gb * 2**30)
        elif name == "export_s":
            what, n = "the export deadline (tasks/build/export.export_deadline)", _runs_out(c, k, export_deadline)
        else:
            continue
        if n:
            found.append({"figure": name, "runs_out_at_tasks": n, "what": what})
    return sorted(found, key=lambda f: f["runs_out_at_tasks"])


# -- the plot ------------------------------------------------------------------------------------
def plot(sizes: dict[str, dict], memory_gb: float, picture: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(int(k) for k in sizes)
    per = {n: figures(sizes[str(n)]) for n in ns}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for s in STEPS:
        have = [n for n in ns if f"{s}_s" in per[n]]
        if have:
            left.plot(have, [per[n][f"{s}_s"] for n in have], "o-", label=s)
            right.plot(have, [per[n][f"{s}_peak_rss_mb"] for n in have], "o-", label=s)
    left.set(xscale="log", yscale="log", xlabel="annotated tasks", ylabel="seconds",
             title="Wall time per step")
    right.axhline(TARGETS["peak_rss_mb_scratch_300k"], color="grey", ls="--", lw=1,
                  label="2 GB target (scratch build, 300k)")
    right.set(xscale="log", xlabel="annotated tasks", ylabel="peak RSS (MB)",
              title=f"Peak RSS per step (machine: {memory_gb:.0f} GB)")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(picture)


# -- main ----------------------------------------------------------------------------------------
def summarise(sizes: dict[str, dict], info: dict) -> dict:
    fits = fit_all(sizes) if len(sizes) >= 2 else {}
    disk_free_gb = shutil.disk_usage(ROOT).free / 2**30
    top = sizes.get(str(max(int(k) for k in sizes)), {})
    lines = memory_lines(sizes, info["memory_gb"]) if len(sizes) >= 2 else {}
    found = limits(fits, info["memory_gb"], disk_free_gb) if fits else []
    found += [{"figure": f"{s}_peak_rss_mb (fixed + per task)", "runs_out_at_tasks": line["runs_out_at_tasks"],
               "what": f"the machine's {info['memory_gb']:.0f} GB of memory"} for s, line in lines.items()]
    return {
        "benchmark": "scale", "machine": info, "targets": TARGETS, "sizes": sizes,
        "fits": fits, "memory_lines": lines,
        "first_limits": sorted(found, key=lambda f: f["runs_out_at_tasks"]),
        "largest": {"tasks": top.get("tasks"),
                    "scratch_peak_rss_mb": top.get("scratch", {}).get("peak_rss_mb"),
                    "incremental_s": top.get("incremental", {}).get("seconds")},
        "note": ("Each size was measured in one run of its own (see its started and load "
                 "averages); the fits are least squares of log figure on log tasks."),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="55000,150000,300000", help="Project sizes, comma-separated.")
    ap.add_argument("--keep", action="store_true", help="Keep the projects and buckets.")
    ap.add_argument("--out", type=Path, default=RESULTS, help="Results file (a trial run: elsewhere).")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1:]), default=str))
        return
    results, picture = args.out, args.out.with_suffix(".png")
    old = json.loads(results.read_text()).get("sizes", {}) if results.exists() else {}
    info = machine()
    sizes = dict(old)
    for n in (int(s) for s in args.sizes.split(",")):
        print(f"{n:,} tasks", flush=True)
        sizes[str(n)] = measure_size(n, args.keep)
        results.write_text(json.dumps(summarise(sizes, info), indent=1) + "\n")
    summary = summarise(sizes, info)
    results.write_text(json.dumps(summary, indent=1) + "\n")
    plot(sizes, info["memory_gb"], picture)
    print(json.dumps({"largest": summary["largest"], "first_limits": summary["first_limits"][:3]}, indent=1))


if __name__ == "__main__":
    main()
