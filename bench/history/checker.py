"""The invariants of issue #18, each a function over a history (``recorder``'s events).

Every function takes the list of events (and plain settings) and returns violations: dicts
with ``invariant``, a ``key`` (the same finding checked again keeps its key, so a driver that
checks after every round reports it once) and ``evidence`` (the observations it rests on).
Nothing here imports sftflow: the rules are written down again from the documented
behaviour, so a bug in sftflow's code is not repeated here.

- ``latest_moves_forward``: ``refs/latest`` only moves to a version whose read of Label Studio
  (its manifest's ``source.watermark``, else ``snapshot_at``; to the second) is not older.
- ``versions_match_scratch``: a version equals a from-scratch build of the state it read. The
  build's filters and near-duplicate rules are not recomputed here (MinHash and the PII
  patterns are not simple); instead, for every build whose Label Studio state stayed frozen
  (no change observed and no driver write while it ran), its rows are compared, by (task,
  annotation, prompt and completion), with a ``sftflow build --scratch`` (the CLI, another
  code path) of the same frozen state into another dataset; split and cluster ids are not
  compared (a scratch build draws its split afresh). Independently, every row must be a
  non-cancelled annotation of that state, and every such annotation a row or an exclusion.
- ``deleted_rows_gone``: a task deleted from Label Studio is in no reader's view (Parquet rows
  with the manifest's deletions applied, ``derived/`` trimmed copies, the OpenAI chat copies)
  of any version built after the deletion; every reader of every version sees the same rows.
- ``announced_finetuned_once``: an announced version has one fine-tuning job per config (a
  failed one with its error), or a recorded skip with a reason.
- ``no_two_runs_of_a_job``: the provider holds at most one job per sftflow job name, and the
  lineage record names that one.
- ``no_duplicate_tasks``: no Label Studio snapshot holds one prompt twice.
- ``no_annotation_lost``: every non-cancelled annotation Label Studio held (last changed at or
  before the version's watermark) is in the version or in its exclusions with a reason.
- ``one_writer_per_lock``: fencing tokens never go back, one owner per token, and no record
  is taken over before its lease ends while its holder's process is still alive.
- ``no_stuck_runs``: no flow run still live past its deadline; no concurrency slot held
  beyond the live runs.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

Event = dict[str, Any]
Violation = dict[str, Any]


# -- reading the history -------------------------------------------------------------------------
def epoch(iso: Any) -> float | None:
    """An ISO 8601 time (naive = UTC) as Unix seconds; None when missing or unreadable."""
    if not iso:
        return None
    try:
        dt = datetime.fromisoformat(str(iso))
    except ValueError:
        return None
    return (dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt).timestamp()


def obs(events: Iterable[Event], what: str, key: str | None = None) -> list[Event]:
    return [e for e in events if e.get("kind") == "obs" and e.get("what") == what
            and (key is None or e.get("key") == key)]


def ops(events: Iterable[Event], name: str | None = None) -> list[Event]:
    return [e for e in events if e.get("kind") == "op" and (name is None or e.get("op") == name)]


def manifests(events: Iterable[Event]) -> dict[tuple[str, str], Event]:
    """(dataset, version) -> the manifest observation (the first; a manifest never changes)."""
    out: dict[tuple[str, str], Event] = {}
    for e in obs(events, "manifest"):
        out.setdefault((e["data"]["dataset"], e["data"]["version"]), e)
    return out


def read_mark(source: dict[str, Any]) -> float | None:
    mark = epoch(source.get("watermark") or source.get("snapshot_at"))
    return None if mark is None else float(int(mark))  # to the second


def build_ops(events: Iterable[Event]) -> list[dict[str, Any]]:
    """The driver's ``sftflow build`` steps that succeeded: dataset, scratch, version, times."""
    out = []
    for e in ops(events, "cli"):
        argv = e["data"].get("argv") or []
        if not argv or argv[0] != "build" or "--dataset" not in argv:
            continue
        res = e.get("result") or {}
        version = (res.get("json") or {}).get("version")
        if res.get("rc") == 0 and version:
            out.append({"dataset": argv[argv.index("--dataset") + 1], "version": version,
                        "scratch": "--scratch" in argv, "start": e["start"], "end": e["end"],
                        "start_wall": e["start_wall"], "seq": e["seq"]})
    return out


def ls_writes(events: Iterable[Event]) -> list[tuple[float, float]]:
    """When the driver wrote to Label Studio (annotations, deletions, ingests)."""
    return [(e["start"], e["end"]) for e in ops(events)
            if e["op"] in ("annotate", "delete-task")
            or (e["op"] == "cli" and (e["data"].get("argv") or [""])[0] == "ingest")]


def frozen_state(events: list[Event], start: float, end: float) -> Event | None:
    """The Label Studio observation in force over [start, end] when nothing changed there (no
    change observed, no driver write overlapping); None otherwise."""
    snaps = obs(events, "ls")
    before = [s for s in snaps if s["t"] <= start]
    if not before or any(start < s["t"] <= end for s in snaps):
        return None
    if any(a < end and b > start for a, b in ls_writes(events)):
        return None
    return before[-1]


def state_at(events: list[Event], t: float) -> Event | None:
    """The last Label Studio observation at or before monotonic time ``t``."""
    before = [s for s in obs(events, "ls") if s["t"] <= t]
    return before[-1] if before else None


def live_annotations(snap: Event, until: float | None = None) -> dict[int, int]:
    """annotation id -> task id of the non-cancelled annotations of a snapshot (last changed at
    or before ``until``, Unix seconds, when given)."""
    out = {}
    for task in snap["data"]["tasks"]:
        for ann_id, cancelled, updated in task["anns"]:
            at = epoch(updated)
            if not cancelled and (until is None or at is None or at <= until):
                out[int(ann_id)] = int(task["id"])
    return out


def state_digest(snap: Event) -> str:
    """What a build reads of a snapshot: its tasks and their annotations (id, cancelled, time)."""
    body = json.dumps([[t["id"], t["anns"]] for t in snap["data"]["tasks"]], sort_keys=True,
                      default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _violation(invariant: str, key: str, what: str, **evidence: Any) -> Violation:
    return {"invariant": invariant, "key": f"{invariant}:{key}", "what": what,
            "evidence": evidence}


def _excluded(m: dict[str, Any]) -> tuple[set[int], set[int], list[dict[str, Any]]]:
    """Annotation ids and task ids a version's exclusions name, and exclusions without reason."""
    anns, tasks, bare = set(), set(), []
    for x in m["exclusions"]:
        if not x.get("reason"):
            bare.append(x)
        if x.get("annotation_id") is not None:
            anns.add(int(x["annotation_id"]))
        elif x.get("task_id") is not None:
            tasks.add(int(x["task_id"]))
    return anns, tasks, bare


# -- the invariants ------------------------------------------------------------------------------
def latest_moves_forward(events: list[Event]) -> list[Violation]:
    found = manifests(events)
    out = []
    for ds in sorted({e["key"] for e in obs(events, "latest")}):
        seen = [e for e in obs(events, "latest", ds) if e["data"]]
        for cur in seen:
            if (ds, cur["data"]) not in found:
                out.append(_violation("latest_moves_forward", f"{ds}@{cur['data']}",
                                      "refs/latest names a version whose manifest was never seen",
                                      dataset=ds, version=cur["data"], at_seq=cur["seq"]))
        for prev, cur in pairwise(seen):
            a, b = found.get((ds, prev["data"])), found.get((ds, cur["data"]))
            if a is None or b is None:
                continue
            ma, mb = read_mark(a["data"]["source"]), read_mark(b["data"]["source"])
            if ma is not None and mb is not None and mb < ma:
                out.append(_violation(
                    "latest_moves_forward", f"{ds}:{prev['data']}->{cur['data']}",
                    "refs/latest moved to a version that read Label Studio earlier",
                    dataset=ds, moved_from=prev["data"], moved_to=cur["data"],
                    from_mark=a["data"]["source"], to_mark=b["data"]["source"],
                    seen_at_seq=cur["seq"]))
    return out


def _row_set(m: dict[str, Any]) -> set[tuple[int, int, str]]:
    return {(int(r[0]), int(r[1]), r[2]) for r in m["rows"]}


def versions_match_scratch(events: list[Event]) -> list[Violation]:
    found = manifests(events)
    builds = [dict(b, state=frozen_state(events, b["start"], b["end"]))
              for b in build_ops(events)]
    scratch: dict[str, dict[str, Any]] = {}
    for b in builds:
        if b["scratch"] and b["state"] is not None:
            scratch.setdefault(state_digest(b["state"]), b)
    out = []
    for b in builds:
        m = found.get((b["dataset"], b["version"]))
        if b["state"] is None or m is None:
            continue
        m = m["data"]
        live = live_annotations(b["state"])
        phantom = sorted([r[0], r[1]] for r in m["rows"] if live.get(int(r[1])) != int(r[0]))
        if phantom:
            out.append(_violation("versions_match_scratch", f"{b['dataset']}@{b['version']}:rows",
                                  "rows that are no non-cancelled annotation of the state read",
                                  dataset=b["dataset"], version=b["version"],
                                  rows=phantom[:20], state_seq=b["state"]["seq"]))
        ref = scratch.get(state_digest(b["state"]))
        if b["scratch"] or ref is None or (ref["dataset"], ref["version"]) not in found:
            continue
        mine, theirs = _row_set(m), _row_set(found[(ref["dataset"], ref["version"])]["data"])
        if mine != theirs:
            out.append(_violation(
                "versions_match_scratch", f"{b['dataset']}@{b['version']}:scratch",
                "a version's rows differ from a --scratch build of the same Label Studio state",
                dataset=b["dataset"], version=b["version"], scratch=ref["version"],
                only_in_version=sorted(mine - theirs)[:20],
                only_in_scratch=sorted(theirs - mine)[:20], state_seq=b["state"]["seq"]))
    return out


def deleted_tasks(events: list[Event]) -> dict[int, float]:
    """task id -> monotonic time it was gone: the driver's deletions, and tasks that vanished
    between two observations."""
    gone: dict[int, float] = {}
    for e in ops(events, "delete-task"):
        if e.get("ok"):
            gone.setdefault(int(e["data"]["task_id"]), e["end"])
    snaps = obs(events, "ls")
    for prev, cur in pairwise(snaps):
        ids = {t["id"] for t in cur["data"]["tasks"]}
        for t in prev["data"]["tasks"]:
            if t["id"] not in ids:
                gone.setdefault(int(t["id"]), cur["t"])
    return gone


def deleted_rows_gone(events: list[Event]) -> list[Violation]:
    found = manifests(events)
    gone = deleted_tasks(events)
    out = []
    for (ds, version), e in sorted(found.items()):
        m = e["data"]
        shas = sorted(r[2] for r in m["rows"])
        declared = sum(int(n) for n in m["rows_declared"].values())
        if declared != len(m["rows"]) or (m["openai_chat"] and m["openai_chat"] != shas):
            out.append(_violation("deleted_rows_gone", f"{ds}@{version}:readers",
                                  "the readers of a version do not see the same rows",
                                  dataset=ds, version=version, declared=declared,
                                  parquet_rows=len(m["rows"]), chat_rows=len(m["openai_chat"])))
    for b in build_ops(events):
        e = found.get((b["dataset"], b["version"]))
        if e is None:
            continue
        m = e["data"]
        before = {t for t, at in gone.items() if at < b["start"]}
        if not before:
            continue
        gone_shas = {r[2] for x in found.values()
                     for r in x["data"]["rows"] + x["data"]["deleted_rows"] if int(r[0]) in before}
        views = {"parquet": sorted({int(r[0]) for r in m["rows"]} & before),
                 "openai_chat": sorted(set(m["openai_chat"]) & gone_shas)}
        for path, rows in m["derived"].items():
            views[f"derived:{path}"] = sorted({int(r[0]) for r in rows} & before)
        for reader, hit in views.items():
            if hit:
                out.append(_violation("deleted_rows_gone", f"{b['dataset']}@{b['version']}:{reader}",
                                      "a task deleted before the build is still read",
                                      dataset=b["dataset"], version=b["version"], reader=reader,
                                      found=hit[:20], deleted_before=sorted(before)[:20],
                                      build_seq=b["seq"]))
    return out


def announced_finetuned_once(events: list[Event], datasets: Iterable[str]) -> list[Violation]:
    lineage = {e["key"]: e["data"] for e in obs(events, "lineage")}
    skips = [n["data"] for n in events if n.get("kind") == "note"
             and n.get("what") == "finetune-skip" and n["data"].get("reason")]
    out = []
    for ds in datasets:
        latest = obs(events, "announced", ds)
        for version in (latest[-1]["data"] if latest else []):
            if any(s["dataset"] == ds and s.get("version") in (None, version) for s in skips):
                continue
            jobs = [r for r in lineage.values() if r["dataset"] == ds and r["version"] == version]
            per_config = Counter(r.get("config_hash") for r in jobs)
            unexplained = [r for r in jobs if r["status"] == "failed" and not r.get("error")]
            if not jobs:
                out.append(_violation("announced_finetuned_once", f"{ds}@{version}:none",
                                      "an announced version was never fine-tuned nor skipped "
                                      "with a reason", dataset=ds, version=version))
            for cfg, n in per_config.items():
                if n > 1:
                    out.append(_violation("announced_finetuned_once", f"{ds}@{version}:{cfg}",
                                          "an announced version fine-tuned more than once",
                                          dataset=ds, version=version,
                                          jobs=sorted(r["job"] for r in jobs)))
            for r in unexplained:
                out.append(_violation("announced_finetuned_once", f"{ds}@{version}:{r['job']}",
                                      "a failed fine-tune without a recorded reason",
                                      dataset=ds, version=version, job=r["job"]))
    return out


def no_two_runs_of_a_job(events: list[Event]) -> list[Violation]:
    provider = obs(events, "provider-jobs")
    jobs = provider[-1]["data"] if provider else []
    per_job: dict[str, list[str]] = defaultdict(list)
    for j in jobs:
        if j.get("job"):
            per_job[j["job"]].append(j["id"])
    out = [_violation("no_two_runs_of_a_job", job, "one job submitted to the provider twice",
                      job=job, provider_jobs=sorted(ids))
           for job, ids in sorted(per_job.items()) if len(ids) > 1]
    if not provider:
        return out
    for key, r in sorted({e["key"]: e["data"] for e in obs(events, "lineage")}.items()):
        ids = per_job.get(r["job"], [])
        if r.get("backend_job_id") and ids and r["backend_job_id"] not in ids:
            out.append(_violation("no_two_runs_of_a_job", f"{r['job']}:lineage",
                                  "the lineage record names another job than the provider's",
                                  job=r["job"], lineage=key, lineage_job_id=r["backend_job_id"],
                                  provider_jobs=sorted(ids)))
    return out


def no_duplicate_tasks(events: list[Event]) -> list[Violation]:
    out, reported = [], set()
    for snap in obs(events, "ls"):
        per = Counter(t["prompt_id"] for t in snap["data"]["tasks"] if t.get("prompt_id"))
        for pid, n in per.items():
            if n > 1 and pid not in reported:
                reported.add(pid)
                ids = [t["id"] for t in snap["data"]["tasks"] if t.get("prompt_id") == pid]
                out.append(_violation("no_duplicate_tasks", pid, "one prompt is two tasks",
                                      prompt_id=pid, tasks=ids, snapshot_seq=snap["seq"]))
    return out


def no_annotation_lost(events: list[Event]) -> list[Violation]:
    out = []
    for (ds, version), e in sorted(manifests(events).items()):
        m = e["data"]
        mark = read_mark(m["source"])
        snap = state_at(events, e["t"])
        if mark is None or snap is None:
            continue
        anns, tasks, bare = _excluded(m)
        rows = {int(r[1]) for r in m["rows"]}
        lost = sorted([a, t] for a, t in live_annotations(snap, until=mark).items()
                      if a not in rows and a not in anns and t not in tasks)
        if lost:
            out.append(_violation("no_annotation_lost", f"{ds}@{version}",
                                  "annotations Label Studio held at the read are in neither the "
                                  "version nor its exclusions", dataset=ds, version=version,
                                  annotations=lost[:20], count=len(lost),
                                  watermark=m["source"].get("watermark"), snapshot_seq=snap["seq"]))
        if bare:
            out.append(_violation("no_annotation_lost", f"{ds}@{version}:reason",
                                  "exclusions without a reason", dataset=ds, version=version,
                                  exclusions=bare[:10]))
    return out


def _alive(events: list[Event], holder: str | None, at_wall: float) -> dict[str, Any] | None:
    """The driver's step whose process is ``holder``'s pid and still ran at ``at_wall``."""
    pid = (holder or "").rpartition(":")[2]
    for e in ops(events, "cli"):
        if str((e.get("result") or {}).get("pid")) == pid and pid and \
                e["start_wall"] <= at_wall <= e["end_wall"]:
            return e
    return None


def one_writer_per_lock(events: list[Event], tolerance_s: float = 1.0,
                        grace_s: float = 5.0) -> list[Violation]:
    out = []
    for key in sorted({e["key"] for e in obs(events, "lock")}):
        seen = obs(events, "lock", key)
        for prev, cur in pairwise(seen):
            a, b = prev["data"], cur["data"]
            ev = {"lock": key, "before": a, "after": b, "seqs": [prev["seq"], cur["seq"]]}
            if (b["token"] or 0) < (a["token"] or 0):
                out.append(_violation("one_writer_per_lock", f"{key}:{cur['seq']}:back",
                                      "a fencing token went back (an old holder wrote after a "
                                      "takeover)", **ev))
            elif b["token"] == a["token"] and b["owner"] != a["owner"]:
                out.append(_violation("one_writer_per_lock", f"{key}:{cur['seq']}:token",
                                      "two owners with one fencing token", **ev))
            elif b["owner"] != a["owner"] and not a["released"]:
                taken = b.get("modified") or cur["wall"]
                lease = epoch(a["expires_at"])
                if lease is None or taken >= lease - tolerance_s:
                    continue
                step = _alive(events, a.get("holder"), taken + grace_s)
                if step is not None:
                    out.append(_violation(
                        "one_writer_per_lock", f"{key}:{cur['seq']}:overlap",
                        "a lock taken over before its lease ended while its holder still ran",
                        holder_step=step["data"].get("argv"), **ev))
    return out


def no_stuck_runs(events: list[Event], at_wall: float, deadline_s: float) -> list[Violation]:
    out = []
    runs = obs(events, "prefect-runs")
    live = runs[-1]["data"] if runs else []
    for r in live:
        started = epoch(r.get("start_time"))
        if r["state"] in ("RUNNING", "CANCELLING") and started and at_wall - started > deadline_s:
            out.append(_violation("no_stuck_runs", r["id"], "a flow run live past its deadline",
                                  run=r, seconds_live=round(at_wall - started, 1),
                                  deadline_s=deadline_s))
    slots = obs(events, "prefect-slots")
    for s in (slots[-1]["data"] if slots else []):
        held = s.get("active_slots") or 0
        deployment = s["name"].removeprefix("deployment:") if s["name"].startswith(
            "deployment:") else None  # a deployment's slots are held by its own runs only
        holders = [r["id"] for r in live if r["state"] in ("RUNNING", "CANCELLING")
                   and (deployment is None or r.get("deployment_id") == deployment)]
        if held > len(holders):
            out.append(_violation("no_stuck_runs", f"slot:{s['name']}:{held}",
                                  "a concurrency slot held with no live run to hold it",
                                  limit=s, live_runs_that_could_hold_it=holders))
    return out


def check_all(events: list[Event], *, datasets: Iterable[str], at_wall: float,
              deadline_s: float = 300.0) -> dict[str, list[Violation]]:
    """Every invariant over one history: name -> violations."""
    datasets = list(datasets)
    return {
        "latest_moves_forward": latest_moves_forward(events),
        "versions_match_scratch": versions_match_scratch(events),
        "deleted_rows_gone": deleted_rows_gone(events),
        "announced_finetuned_once": announced_finetuned_once(events, datasets),
        "no_two_runs_of_a_job": no_two_runs_of_a_job(events),
        "no_duplicate_tasks": no_duplicate_tasks(events),
        "no_annotation_lost": no_annotation_lost(events),
        "one_writer_per_lock": one_writer_per_lock(events),
        "no_stuck_runs": no_stuck_runs(events, at_wall, deadline_s),
    }
