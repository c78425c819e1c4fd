"""The soak's history checker (``bench/history/checker.py``) on hand-written histories: for each
invariant, one history that violates it and one that does not. Pure: no services."""

from __future__ import annotations

from typing import Any

from bench.history import checker
from bench.history.recorder import History, content_sha, load

T0 = "2026-01-01T00:00:00+00:00"
T1 = "2026-01-01T00:01:00+00:00"
T2 = "2026-01-01T00:02:00+00:00"


class H:
    """A history written by hand: events with increasing clocks."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.t = 0.0

    def add(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.t += 1
        e = {"seq": len(self.events) + 1, "kind": kind, "t": self.t, "wall": 1000 + self.t,
             **fields}
        self.events.append(e)
        return e

    def obs(self, what: str, key: str, data: Any) -> dict[str, Any]:
        return self.add("obs", what=what, key=key, data=data)

    def ls(self, *tasks: dict[str, Any]) -> dict[str, Any]:
        return self.obs("ls", "soak", {"project_id": 1, "tasks": list(tasks)})

    def op(self, op: str, *, argv: list[str] | None = None, result: dict[str, Any] | None = None,
           seconds: float = 2, ok: bool = True, **data: Any) -> dict[str, Any]:
        start = self.t + 0.5
        self.t += seconds
        return self.add("op", op=op, process="driver", start=start, end=self.t - 0.1,
                        start_wall=1000 + start, end_wall=1000 + self.t - 0.1, ok=ok,
                        data={**data, **({"argv": argv} if argv else {})}, result=result or {})

    def build(self, dataset: str, version: str, *, scratch: bool = False,
              pid: int = 0) -> dict[str, Any]:
        argv = ["build", "--project", "soak", "--dataset", dataset, "--json"]
        return self.op("cli", argv=argv + (["--scratch"] if scratch else []),
                       result={"rc": 0, "json": {"version": version}, "pid": pid})

    def manifest(self, ds: str, version: str, rows: list[tuple[int, int]], *,
                 watermark: str = T1, exclusions: list[dict[str, Any]] | None = None,
                 derived: dict[str, list[list[int]]] | None = None,
                 chat: list[str] | None = None, declared: int | None = None) -> dict[str, Any]:
        full = [[t, a, content_sha(f"p{t}", f"c{a}"), f"h{a}", "train"] for t, a in rows]
        return self.obs("manifest", ds, {
            "dataset": ds, "version": version, "parent": None, "created_at": T1,
            "source": {"watermark": watermark},
            "rows_declared": {"train": len(rows) if declared is None else declared},
            "rows": full, "deleted_rows": [], "derived": derived or {},
            "openai_chat": sorted(r[2] for r in full) if chat is None else chat,
            "exclusions": exclusions or []})


def task(tid: int, *anns: int, pid: str | None = None, cancelled: tuple[int, ...] = (),
         at: str = T0) -> dict[str, Any]:
    return {"id": tid, "prompt_id": pid or f"p{tid}", "updated_at": at,
            "anns": [[a, a in cancelled, at] for a in anns]}


def keys(found: list[dict[str, Any]]) -> list[str]:
    return [v["key"] for v in found]


# -- refs/latest only moves to a newer read ------------------------------------------------------
def test_latest_moving_back_to_an_older_read_is_a_violation():
    h = H()
    h.manifest("soak", "v1", [(1, 10)], watermark=T1)
    h.manifest("soak", "v0", [(1, 10)], watermark=T0)
    h.obs("latest", "soak", "v1")
    h.obs("latest", "soak", "v0")
    found = checker.latest_moves_forward(h.events)
    assert keys(found) == ["latest_moves_forward:soak:v1->v0"]
    assert found[0]["evidence"]["to_mark"] == {"watermark": T0}


def test_latest_moving_forward_and_ties_pass():
    h = H()
    h.manifest("soak", "v0", [(1, 10)], watermark=T0)
    h.manifest("soak", "v1", [(1, 10)], watermark=T1)
    h.manifest("soak", "v2", [(1, 10)], watermark="2026-01-01T00:01:00.700000+00:00")
    for v in ("v0", "v1", "v2"):
        h.obs("latest", "soak", v)
    assert checker.latest_moves_forward(h.events) == []


def test_latest_naming_a_version_never_seen_is_a_violation():
    h = H()
    h.obs("latest", "soak", "ghost")
    assert keys(checker.latest_moves_forward(h.events)) == ["latest_moves_forward:soak@ghost"]


# -- a version equals a --scratch build of the state it read -------------------------------------
def test_version_differing_from_scratch_of_the_same_state_is_a_violation():
    h = H()
    h.ls(task(1, 10), task(2, 20))
    h.build("soak", "v1")
    h.build("soak-scratch", "s1", scratch=True)
    h.manifest("soak", "v1", [(1, 10)])  # annotation 20 missing
    h.manifest("soak-scratch", "s1", [(1, 10), (2, 20)])
    found = checker.versions_match_scratch(h.events)
    assert keys(found) == ["versions_match_scratch:soak@v1:scratch"]
    assert found[0]["evidence"]["only_in_scratch"] == [(2, 20, content_sha("p2", "c20"))]


def test_version_equal_to_scratch_passes_and_a_changed_state_is_not_compared():
    h = H()
    h.ls(task(1, 10), task(2, 20))
    h.build("soak", "v1")
    h.build("soak-scratch", "s1", scratch=True)
    h.manifest("soak", "v1", [(1, 10), (2, 20)])
    h.manifest("soak-scratch", "s1", [(1, 10), (2, 20)])
    assert checker.versions_match_scratch(h.events) == []
    h2 = H()  # the state changed while the build ran: not comparable with the scratch build
    h2.ls(task(1, 10))
    b = h2.build("soak", "v1", )
    h2.events.append({**h2.events[0], "seq": 99, "t": b["start"] + 0.2,
                      "data": {"project_id": 1, "tasks": [task(1, 10), task(2, 20)]}})
    h2.events.sort(key=lambda e: e["t"])
    h2.build("soak-scratch", "s1", scratch=True)
    h2.manifest("soak", "v1", [(1, 10)])
    h2.manifest("soak-scratch", "s1", [(1, 10), (2, 20)])
    assert checker.versions_match_scratch(h2.events) == []


def test_row_of_no_annotation_of_the_state_read_is_a_violation():
    h = H()
    h.ls(task(1, 10), task(2, 20, cancelled=(20,)))
    h.build("soak", "v1")
    h.manifest("soak", "v1", [(1, 10), (2, 20)])
    found = checker.versions_match_scratch(h.events)
    assert keys(found) == ["versions_match_scratch:soak@v1:rows"]
    assert found[0]["evidence"]["rows"] == [[2, 20]]


# -- a deleted row is gone for every reader ------------------------------------------------------
def test_deleted_task_still_read_after_a_later_build_is_a_violation():
    h = H()
    h.ls(task(1, 10), task(2, 20))
    h.op("delete-task", task_id=2)
    h.ls(task(1, 10))
    h.build("soak", "v2")
    h.manifest("soak", "v2", [(1, 10)], derived={"shards/a.parquet": [[1, 10], [2, 20]]})
    found = checker.deleted_rows_gone(h.events)
    assert keys(found) == ["deleted_rows_gone:soak@v2:derived:shards/a.parquet"]
    assert found[0]["evidence"]["found"] == [2]


def test_deleted_task_gone_from_every_reader_passes():
    h = H()
    h.ls(task(1, 10), task(2, 20))
    h.build("soak", "v1")
    h.manifest("soak", "v1", [(1, 10), (2, 20)])  # built before the deletion: may hold it
    h.op("delete-task", task_id=2)
    h.ls(task(1, 10))
    h.build("soak", "v2")
    h.manifest("soak", "v2", [(1, 10)], derived={"shards/a.parquet": [[1, 10]]})
    assert checker.deleted_rows_gone(h.events) == []


def test_readers_disagreeing_on_a_version_is_a_violation():
    h = H()
    h.manifest("soak", "v1", [(1, 10), (2, 20)], chat=[content_sha("p1", "c10")])
    assert keys(checker.deleted_rows_gone(h.events)) == ["deleted_rows_gone:soak@v1:readers"]


# -- every announced version fine-tuned exactly once, or skipped with a reason -------------------
def test_announced_version_never_fine_tuned_or_twice_is_a_violation():
    h = H()
    h.obs("announced", "soak", ["v1", "v2"])
    for job in ("ft-a", "ft-b"):
        h.obs("lineage", f"models/{job}/manifest.json", {
            "job": job, "dataset": "soak", "version": "v2", "status": "succeeded",
            "config_hash": "c", "backend_job_id": job, "error": None})
    assert keys(checker.announced_finetuned_once(h.events, ["soak"])) == [
        "announced_finetuned_once:soak@v1:none", "announced_finetuned_once:soak@v2:c"]


def test_announced_version_fine_tuned_once_or_skipped_with_reason_passes():
    h = H()
    h.obs("announced", "soak", ["v1", "v2"])
    h.obs("announced", "soak-scratch", ["s1"])
    h.obs("lineage", "models/ft-a/manifest.json", {
        "job": "ft-a", "dataset": "soak", "version": "v1", "status": "succeeded",
        "config_hash": "c", "backend_job_id": "j1", "error": None})
    h.add("note", what="finetune-skip", data={"dataset": "soak", "version": "v2",
                                               "reason": "gate: fewer than 1 train rows"})
    h.add("note", what="finetune-skip", data={"dataset": "soak-scratch", "version": None,
                                               "reason": "reference build"})
    assert checker.announced_finetuned_once(h.events, ["soak", "soak-scratch"]) == []


# -- no two runs of the same job ------------------------------------------------------------------
def test_a_job_submitted_twice_is_a_violation():
    h = H()
    h.obs("provider-jobs", "all", [{"id": "j1", "status": "succeeded", "job": "ft-a"},
                                   {"id": "j2", "status": "running", "job": "ft-a"}])
    found = checker.no_two_runs_of_a_job(h.events)
    assert keys(found) == ["no_two_runs_of_a_job:ft-a"]
    assert found[0]["evidence"]["provider_jobs"] == ["j1", "j2"]


def test_one_run_per_job_passes_and_a_lineage_naming_another_job_does_not():
    h = H()
    h.obs("provider-jobs", "all", [{"id": "j1", "status": "succeeded", "job": "ft-a"},
                                   {"id": "j2", "status": "succeeded", "job": "ft-b"}])
    h.obs("lineage", "models/ft-a/manifest.json", {"job": "ft-a", "backend_job_id": "j1"})
    assert checker.no_two_runs_of_a_job(h.events) == []
    h.obs("lineage", "models/ft-b/manifest.json", {"job": "ft-b", "backend_job_id": "j9"})
    assert keys(checker.no_two_runs_of_a_job(h.events)) == ["no_two_runs_of_a_job:ft-b:lineage"]


# -- no duplicate task at any observed moment -----------------------------------------------------
def test_a_prompt_twice_at_one_moment_is_a_violation_even_if_repaired_later():
    h = H()
    h.ls(task(1), task(2, pid="same"), task(3, pid="same"))
    h.ls(task(1), task(2, pid="same"))
    found = checker.no_duplicate_tasks(h.events)
    assert keys(found) == ["no_duplicate_tasks:same"]
    assert found[0]["evidence"]["tasks"] == [2, 3]


def test_distinct_prompts_pass():
    h = H()
    h.ls(task(1), task(2), task(3))
    assert checker.no_duplicate_tasks(h.events) == []


# -- no annotation lost ---------------------------------------------------------------------------
def test_an_annotation_in_neither_rows_nor_exclusions_is_lost():
    h = H()
    h.ls(task(1, 10), task(2, 20), task(3, 30, cancelled=(30,)), task(4, 40, at=T2))
    h.manifest("soak", "v1", [(1, 10)], watermark=T1)  # 20 lost; 30 cancelled; 40 after the read
    found = checker.no_annotation_lost(h.events)
    assert keys(found) == ["no_annotation_lost:soak@v1"]
    assert found[0]["evidence"]["annotations"] == [[20, 2]]


def test_annotations_in_rows_or_exclusions_with_reason_pass_and_without_reason_do_not():
    h = H()
    h.ls(task(1, 10), task(2, 20), task(3, 30))
    h.manifest("soak", "v1", [(1, 10)], exclusions=[
        {"task_id": 2, "annotation_id": 20, "stage": "filter", "reason": "too short"},
        {"task_id": 3, "annotation_id": None, "stage": "export", "reason": "no prompt"}])
    assert checker.no_annotation_lost(h.events) == []
    h.manifest("soak", "v2", [(1, 10)], exclusions=[
        {"task_id": 2, "annotation_id": 20, "stage": "filter", "reason": ""},
        {"task_id": 3, "annotation_id": 30, "stage": "dedup", "reason": "near duplicate"}])
    assert keys(checker.no_annotation_lost(h.events)) == ["no_annotation_lost:soak@v2:reason"]


# -- at most one writer per lock ------------------------------------------------------------------
def lock(owner: str, token: int, expires: float, *, released: bool = False, holder: str = "h:1",
         modified: float = 0) -> dict[str, Any]:
    from datetime import UTC, datetime

    return {"owner": owner, "token": token, "released": released, "holder": holder,
            "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(), "modified": modified}


def test_takeover_before_the_lease_while_the_holder_runs_is_a_violation():
    h = H()
    step = h.op("cli", argv=["build", "--dataset", "soak"], seconds=30,
                result={"rc": 0, "pid": 4242})
    key = "_sftflow/locks/b.json"
    h.events.insert(0, {"seq": 0, "kind": "obs", "what": "lock", "key": key, "t": 0.1,
                        "wall": 1000.1, "data": lock("A", 1, 1100, holder="host:4242",
                                                     modified=1000.1)})
    h.obs("lock", key, lock("B", 2, 1110, holder="host:77", modified=step["start_wall"] + 5))
    found = checker.one_writer_per_lock(h.events)
    assert keys(found) == [f"one_writer_per_lock:{key}:{h.events[-1]['seq']}:overlap"]


def test_token_going_back_or_shared_is_a_violation_and_takeover_after_expiry_passes():
    h = H()
    key = "_sftflow/locks/i.json"
    h.obs("lock", key, lock("A", 1, 1001.5))
    h.obs("lock", key, lock("B", 2, 1050, modified=1003))  # A's lease was over: fine
    h.obs("lock", key, lock("C", 3, 1060, modified=1004, released=True))
    h.obs("lock", key, lock("D", 4, 1070, modified=1005))  # C released: fine
    assert checker.one_writer_per_lock(h.events) == []
    h.obs("lock", key, lock("C", 3, 1080, modified=1006))  # C renewed after D took over
    h.obs("lock", key, lock("E", 3, 1090, modified=1007))
    found = checker.one_writer_per_lock(h.events)
    assert [k.rsplit(":", 1)[1] for k in keys(found)] == ["back", "token"]


# -- no run stuck past its deadline, no leaked slot -----------------------------------------------
def test_a_run_live_past_its_deadline_and_a_leaked_slot_are_violations():
    h = H()
    h.obs("prefect-runs", "live", [{"id": "r1", "name": "x", "state": "RUNNING",
                                    "start_time": T0, "deployment_id": None}])
    h.obs("prefect-slots", "all", [{"name": "deployment:d", "limit": 1, "active_slots": 2}])
    found = checker.no_stuck_runs(h.events, at_wall=checker.epoch(T0) + 600, deadline_s=300)
    assert keys(found) == ["no_stuck_runs:r1", "no_stuck_runs:slot:deployment:d:2"]


def test_runs_within_their_deadline_and_slots_they_hold_pass():
    h = H()
    h.obs("prefect-runs", "live", [{"id": "r1", "name": "x", "state": "RUNNING",
                                    "start_time": T0, "deployment_id": "d"}])
    h.obs("prefect-slots", "all", [{"name": "deployment:d", "limit": 1, "active_slots": 1}])
    assert checker.no_stuck_runs(h.events, at_wall=checker.epoch(T0) + 60, deadline_s=300) == []


# -- the recorder and the whole check -------------------------------------------------------------
def test_history_round_trips_and_check_all_names_every_invariant(tmp_path):
    hist = History(tmp_path / "h.jsonl")
    with hist.op("annotate", tasks=3) as rec:
        rec["result"] = {"annotated": 3}
    hist.note("finetune-skip", dataset="soak-scratch", version=None, reason="reference")
    hist.observe("ls", "soak", {"project_id": 1, "tasks": [task(1, 10)]})
    path = hist.compress()
    events = load(path)
    assert [e["kind"] for e in events] == ["op", "note", "obs"]
    assert events[0]["end"] >= events[0]["start"] and events[0]["result"] == {"annotated": 3}
    result = checker.check_all(events, datasets=["soak"], at_wall=2000)
    assert sorted(result) == sorted([
        "latest_moves_forward", "versions_match_scratch", "deleted_rows_gone",
        "announced_finetuned_once", "no_two_runs_of_a_job", "no_duplicate_tasks",
        "no_annotation_lost", "one_writer_per_lock", "no_stuck_runs"])
    assert all(v == [] for v in result.values())
