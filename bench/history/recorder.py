"""The history of a soak: what the driver did and what an observer saw, one JSON line each.

``History`` is append-only JSONL. Every line has ``seq``, ``kind`` and two clocks: ``t``
(``time.monotonic()``, for ordering) and ``wall`` (Unix seconds, to compare with the times the
services write). Kinds:

- ``op``: one operation of the driver, written when it ends: ``op`` (``cli``, ``annotate``,
  ``delete-task``, ...), ``process`` (who: ``driver``, ``step-12``), ``start``/``end`` (monotonic)
  and ``start_wall``/``end_wall``, ``ok``, ``data`` (what was asked, read or written);
- ``note``: a fact the driver states (``finetune-skip`` with a ``reason``);
- ``obs``: an observation: ``what`` (``latest``, ``manifest``, ``announced``, ``lineage``,
  ``lock``, ``ls``, ``prefect-runs``, ``prefect-slots``, ``provider-jobs``), ``key``, ``data``.
  The observer writes one only when what it sees changed, so the state of a thing at time t
  is its last observation at or before t.

``Observer`` polls every ~0.5 s on the services' own interfaces, with none of sftflow's code:
S3 with plain boto3 (each dataset's ``refs/latest``, ``refs/announced/``, manifests, whose rows
it reads with pyarrow as every reader sees them, the lineage records and the lock records),
Label Studio's REST API with httpx (the project's tasks and annotations, ``updated_at``
included), Prefect's REST API (flow runs not finished, concurrency slots) and the fine-tuning
provider's (its jobs), so the history holds what processes the driver does not control did.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def digest(obj: Any) -> str:
    """16 hex chars of sha256 over canonical JSON (the checker's own hash)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_sha(prompt: Any, completion: Any) -> str:
    """What a row says, whatever file it is read from: prompt and completion."""
    return hashlib.sha256(f"{prompt}\x00{completion}".encode()).hexdigest()[:16]


class History:
    """An append-only JSONL history (thread-safe)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self._seq = 0

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            self._seq += 1
            line = {"seq": self._seq, "kind": kind, "t": time.monotonic(), "wall": time.time(),
                    **fields}
            self._f.write(json.dumps(line, default=str) + "\n")
            self._f.flush()
        return line

    @contextmanager
    def op(self, op: str, process: str = "driver", **data: Any) -> Iterator[dict[str, Any]]:
        """Record one operation; the block may add to the dict it gets (``result``, ``ok``)."""
        rec: dict[str, Any] = {"data": dict(data), "ok": True}
        start, start_wall = time.monotonic(), time.time()
        try:
            yield rec
        except BaseException as err:
            rec["ok"], rec["error"] = False, f"{type(err).__name__}: {err}"[:300]
            raise
        finally:
            self.write("op", op=op, process=process, start=start, end=time.monotonic(),
                       start_wall=start_wall, end_wall=time.time(), **rec)

    def note(self, what: str, **data: Any) -> None:
        self.write("note", what=what, data=data)

    def observe(self, what: str, key: str, data: Any, **extra: Any) -> None:
        self.write("obs", what=what, key=key, data=data, **extra)

    def close(self) -> None:
        with self._lock:
            self._f.close()

    def compress(self) -> Path:
        """The history gzipped beside itself (the plain file removed)."""
        self.close()
        out = self.path.with_name(self.path.name + ".gz")
        with self.path.open("rb") as src, gzip.open(out, "wb") as dst:
            dst.write(src.read())
        self.path.unlink()
        return out


def load(path: Path) -> list[dict[str, Any]]:
    """The events of a history file (``.jsonl`` or ``.jsonl.gz``), in order."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Endpoints:
    """Where the observer looks (nothing of sftflow's settings: plain values)."""

    s3_endpoint: str
    s3_key: str
    s3_secret: str
    bucket: str
    datasets: list[str]
    ls_url: str
    ls_token: str
    project_title: str
    prefect_api: str = ""
    provider_url: str = ""
    provider_key: str = ""
    datasets_prefix: str = "datasets"
    state_prefix: str = "_sftflow"
    models_prefix: str = "models"
    region: str = "us-east-1"
    extra: dict[str, Any] = field(default_factory=dict)


class Observer:
    """Polls the services every ``interval_s`` in a thread and records what changed."""

    def __init__(self, history: History, ep: Endpoints, interval_s: float = 0.5):
        import boto3
        import httpx
        from botocore.config import Config

        self.h, self.ep, self.interval_s = history, ep, interval_s
        self.s3 = boto3.client("s3", endpoint_url=ep.s3_endpoint, aws_access_key_id=ep.s3_key,
                               aws_secret_access_key=ep.s3_secret, region_name=ep.region,
                               config=Config(retries={"max_attempts": 2}))
        self.http = httpx.Client(timeout=10)
        self._seen: dict[tuple[str, str], str] = {}
        self._manifests: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sweeps = 0
        self.errors = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Observer:
        self._thread = threading.Thread(target=self._loop, name="history-observer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sweep()
            self._stop.wait(self.interval_s)

    def sweep(self) -> None:
        """One look at everything (errors recorded, never raised)."""
        for part in (self.s3_refs, self.s3_lineage, self.s3_locks, self.labelstudio,
                     self.prefect, self.provider):
            try:
                part()
            except Exception as err:  # noqa: BLE001 - a service may be restarting: recorded
                self.errors += 1
                self._changed("observer-error", part.__name__, f"{type(err).__name__}: {err}"[:300])
        self.sweeps += 1

    def _changed(self, what: str, key: str, data: Any, **extra: Any) -> bool:
        d = digest(data)
        if self._seen.get((what, key)) == d:
            return False
        self._seen[(what, key)] = d
        self.h.observe(what, key, data, **extra)
        return True

    # -- S3 ----------------------------------------------------------------------------------------
    def _list(self, prefix: str) -> list[dict[str, Any]]:
        out, token = [], None
        while True:
            kw = {"Bucket": self.ep.bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self.s3.list_objects_v2(**kw)
            out += page.get("Contents", [])
            token = page.get("NextContinuationToken")
            if not token:
                return out

    def _get(self, key: str) -> tuple[bytes, Any] | None:
        try:
            obj = self.s3.get_object(Bucket=self.ep.bucket, Key=key)
        except self.s3.exceptions.NoSuchKey:
            return None
        return obj["Body"].read(), obj.get("LastModified")

    def _root(self, dataset: str) -> str:
        p = self.ep.datasets_prefix.strip("/")
        return f"{p}/{dataset}" if p else dataset

    def s3_refs(self) -> None:
        for ds in self.ep.datasets:
            root = self._root(ds)
            got = self._get(f"{root}/refs/latest")
            self._changed("latest", ds, got[0].decode().strip() if got else None)
            announced = sorted(o["Key"].rsplit("/", 1)[-1]
                               for o in self._list(f"{root}/refs/announced/"))
            self._changed("announced", ds, announced)
            for o in self._list(f"{root}/versions/"):
                if o["Key"].endswith("/manifest.json") and o["Key"] not in self._manifests:
                    self._manifests.add(o["Key"])
                    self.h.observe("manifest", ds, self.read_version(root, o["Key"]))

    def read_version(self, root: str, key: str) -> dict[str, Any]:
        """A manifest and what every reader of it sees: the Parquet rows with its deletions
        applied, the trimmed copies under ``derived/``, the OpenAI chat copies (deletions
        applied by position), and its exclusions."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        m = json.loads(self._get(key)[0])
        deleted = {p: set(v) for p, v in (m.get("deleted") or {}).items()}
        rows, gone, by_sha = [], [], {}
        for f in m["files"]:
            if f["format"] != "parquet":
                continue
            t = pq.read_table(pa.BufferReader(self._get(f"{root}/{f['path']}")[0]),
                              columns=["task_id", "annotation_id", "prompt", "completion",
                                       "row_hash", "split"]).to_pylist()
            by_sha[f["sha256"]] = f["path"]
            for i, r in enumerate(t):
                row = [r["task_id"], r["annotation_id"], content_sha(r["prompt"], r["completion"]),
                       r["row_hash"], r["split"]]
                (gone if i in deleted.get(f["path"], ()) else rows).append(row)
        version = m["version"]
        derived = {}
        for o in self._list(f"{root}/derived/{version}/"):
            t = pq.read_table(pa.BufferReader(self._get(o["Key"])[0]),
                              columns=["task_id", "annotation_id"]).to_pylist()
            derived[o["Key"].split(f"/derived/{version}/", 1)[1]] = [
                [r["task_id"], r["annotation_id"]] for r in t]
        chat = []
        for f in m["files"]:
            if f["format"] == "openai_chat":
                skip = deleted.get(by_sha.get(f.get("of") or "", ""), set())
                lines = self._get(f"{root}/{f['path']}")[0].decode().splitlines()
                chat += [_chat_sha(line) for i, line in enumerate(lines)
                         if line.strip() and i not in skip]
        exclusions = []
        for f in m["files"]:
            if f["format"] == "exclusions":
                for line in self._get(f"{root}/{f['path']}")[0].decode().splitlines():
                    if line.strip():
                        e = json.loads(line)
                        exclusions.append({k: e.get(k) for k in
                                           ("task_id", "annotation_id", "stage", "reason")})
        return {"dataset": m["dataset"], "version": version, "parent": m.get("parent"),
                "created_at": m.get("created_at"), "source": m.get("source") or {},
                "rows_declared": m.get("rows") or {}, "rows": rows, "deleted_rows": gone,
                "derived": derived, "openai_chat": sorted(chat), "exclusions": exclusions}

    def s3_lineage(self) -> None:
        prefix = self.ep.models_prefix.strip("/") + "/"
        for o in self._list(prefix):
            if not o["Key"].endswith("/manifest.json") or "/_refs/" in o["Key"]:
                continue
            got = self._get(o["Key"])
            if got:
                r = json.loads(got[0])
                self._changed("lineage", o["Key"], {k: r.get(k) for k in (
                    "job", "dataset", "version", "status", "backend", "backend_job_id",
                    "config_hash", "error")})

    def s3_locks(self) -> None:
        for o in self._list(self.ep.state_prefix.strip("/") + "/locks/"):
            got = self._get(o["Key"])
            if got:
                r = json.loads(got[0])
                modified = got[1].timestamp() if got[1] is not None else None
                self._changed("lock", o["Key"], {
                    "owner": r.get("owner"), "token": r.get("token"),
                    "expires_at": r.get("expires_at"), "released": bool(r.get("released")),
                    "holder": r.get("holder"), "modified": modified})

    # -- Label Studio, Prefect, the provider -------------------------------------------------------
    def labelstudio(self) -> None:
        hdr = {"Authorization": f"Token {self.ep.ls_token}"}
        base = self.ep.ls_url.rstrip("/")
        projects = self.http.get(f"{base}/api/projects", headers=hdr,
                                 params={"title": self.ep.project_title, "page_size": 100})
        projects.raise_for_status()
        found = [p for p in projects.json().get("results", []) if p["title"] == self.ep.project_title]
        if not found:
            return
        began = time.monotonic()
        tasks, page = [], 1
        while True:
            r = self.http.get(f"{base}/api/tasks", headers=hdr, params={
                "project": found[0]["id"], "fields": "all", "page_size": 500, "page": page})
            if r.status_code == 404:
                break
            r.raise_for_status()
            body = r.json()
            got = body.get("tasks", []) if isinstance(body, dict) else body
            tasks += got
            if len(got) < 500 or (isinstance(body, dict) and len(tasks) >= body.get("total", 0)):
                break
            page += 1
        snap = sorted(({"id": t["id"], "prompt_id": (t.get("data") or {}).get("prompt_id"),
                        "updated_at": t.get("updated_at"),
                        "anns": sorted([a["id"], bool(a.get("was_cancelled")), a.get("updated_at")]
                                       for a in t.get("annotations") or [])}
                       for t in tasks), key=lambda t: t["id"])
        self._changed("ls", self.ep.project_title, {"project_id": found[0]["id"], "tasks": snap},
                      read_start=began)

    def prefect(self) -> None:
        if not self.ep.prefect_api:
            return
        api = self.ep.prefect_api.rstrip("/")
        live = ["PENDING", "RUNNING", "CANCELLING", "PAUSED"]
        r = self.http.post(f"{api}/flow_runs/filter", json={
            "flow_runs": {"state": {"type": {"any_": live}}}, "limit": 200})
        r.raise_for_status()
        runs = sorted(({"id": x["id"], "name": x.get("name"), "state": x.get("state_type"),
                        "start_time": x.get("start_time"), "deployment_id": x.get("deployment_id")}
                       for x in r.json()), key=lambda x: x["id"])
        self._changed("prefect-runs", "live", runs)
        slots: list[dict[str, Any]] = []
        v2 = self.http.post(f"{api}/v2/concurrency_limits/filter", json={})
        if v2.status_code == 200:
            slots += [{"name": x["name"], "limit": x.get("limit"),
                       "active_slots": x.get("active_slots", 0)} for x in v2.json()]
        v1 = self.http.post(f"{api}/concurrency_limits/filter", json={})
        if v1.status_code == 200:
            slots += [{"name": f"tag:{x['tag']}", "limit": x.get("concurrency_limit"),
                       "active_slots": len(x.get("active_slots") or [])} for x in v1.json()]
        self._changed("prefect-slots", "all", sorted(slots, key=lambda s: s["name"]))

    def provider(self) -> None:
        if not self.ep.provider_url:
            return
        jobs, after = [], None
        while True:
            params = {"limit": 100, **({"after": after} if after else {})}
            r = self.http.get(f"{self.ep.provider_url.rstrip('/')}/fine_tuning/jobs", params=params,
                              headers={"Authorization": f"Bearer {self.ep.provider_key}"})
            r.raise_for_status()
            body = r.json()
            jobs += [{"id": j["id"], "status": j.get("status"),
                      "job": (j.get("metadata") or {}).get("sftflow_job")} for j in body["data"]]
            if not body.get("has_more") or not body["data"]:
                break
            after = body["data"][-1]["id"]
        self._changed("provider-jobs", "all", sorted(jobs, key=lambda j: j["id"]))


def _chat_sha(line: str) -> str:
    """The content of one OpenAI chat JSONL line: its user prompt and assistant completion."""
    msgs = json.loads(line).get("messages") or []
    user = next((m.get("content") for m in msgs if m.get("role") == "user"), None)
    answer = next((m.get("content") for m in reversed(msgs) if m.get("role") == "assistant"), None)
    return content_sha(user, answer)


__all__ = ["Endpoints", "History", "Observer", "content_sha", "digest", "load"]
