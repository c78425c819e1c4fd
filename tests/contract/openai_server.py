"""A local HTTP server implementing the OpenAI files, fine-tuning jobs and chat endpoints.

This is a CONTRACT TEST double: the real OpenAI API is unreachable from this machine, so the
``openai`` backend is tested against this server, which follows the documented request and
response shapes (https://platform.openai.com/docs/api-reference/fine-tuning):

- ``POST /v1/files`` (multipart: ``purpose=fine-tune``, ``file``) -> a file object;
- ``GET /v1/files/{id}``;
- ``POST /v1/fine_tuning/jobs`` (``model``, ``training_file``, ``validation_file``, ``suffix``,
  ``seed``, ``metadata``, ``method``) -> a job object in ``validating_files``;
- ``GET /v1/fine_tuning/jobs`` (``limit``, ``after``, ``metadata[k]=v`` filters);
- ``GET /v1/fine_tuning/jobs/{id}``, ``GET /v1/fine_tuning/jobs/{id}/events``,
  ``POST /v1/fine_tuning/jobs/{id}/cancel``;
- ``POST /v1/chat/completions`` (``model``, ``messages``, ``max_tokens`` or
  ``max_completion_tokens``, ``temperature``) -> a ``chat.completion`` object
  (https://platform.openai.com/docs/api-reference/chat/create), as vLLM and TGI serve it too.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with 400/401/404. A job moves one
step per ``GET`` of it (validating_files -> queued -> running -> succeeded), writing
``message`` and ``metrics`` events on the way, so tests are deterministic and fast. Jobs on a
model listed in ``fail_models`` fail while running, as a provider does when training breaks.
A chat answer is derived from the request alone: ``"Draft: "`` + the last user message, cut
to ``max_tokens`` whitespace-separated words (``finish_reason: "length"``); it is served for
the listed models and for the ``fine_tuned_model`` of a succeeded job; every chat request
body is kept in ``state.chats``.
It is stdlib only (``http.server``) and runs on a loopback port in a thread.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

STEPS = ("validating_files", "queued", "running", "running", "done")


class FakeState:
    def __init__(self, api_key: str, models: set[str], fail_models: set[str]):
        self.api_key = api_key
        self.models = models
        self.fail_models = fail_models
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.steps: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.chats: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._ids = itertools.count(1)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):06d}"

    def event(self, job_id: str, message: str, type_: str = "message", data: Any = None,
              level: str = "info") -> None:
        self.events[job_id].append({
            "object": "fine_tuning.job.event", "id": self.new_id("ftevent"),
            "created_at": int(time.time()), "level": level, "message": message,
            "type": type_, "data": data or {},
        })

    def advance(self, job_id: str) -> None:
        """One step of the job's life, taken when a client reads it."""
        job = self.jobs[job_id]
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return
        self.steps[job_id] += 1
        step = STEPS[min(self.steps[job_id], len(STEPS) - 1)]
        if step in ("queued", "running") and job["status"] != step:
            job["status"] = step
            self.event(job_id, f"Job {step}")
        if step == "running":
            n = sum(1 for e in self.events[job_id] if e["type"] == "metrics") + 1
            if job["model"] in self.fail_models:
                job["status"] = "failed"
                job["finished_at"] = int(time.time())
                job["error"] = {"code": "training_error", "param": None,
                                "message": f"Training diverged at step {n}: loss is NaN."}
                self.event(job_id, job["error"]["message"], level="error")
                return
            self.event(job_id, f"Step {n}/2: training loss={2.0 / n:.3f}", "metrics",
                       {"step": n, "train_loss": 2.0 / n, "valid_loss": 2.1 / n,
                        "train_mean_token_accuracy": 0.5 + 0.1 * n})
        if step == "done":
            job["status"] = "succeeded"
            job["finished_at"] = int(time.time())
            suffix = job.get("suffix") or "custom"
            job["fine_tuned_model"] = f"ft:{job['model']}:sftflow:{suffix}:{job_id[-6:]}"
            job["trained_tokens"] = len(self.contents[job["training_file"]]) // 4
            result = self.new_id("file")
            self.files[result] = {"id": result, "object": "file", "purpose": "fine-tune-results",
                                  "filename": "step_metrics.csv", "bytes": 0,
                                  "created_at": int(time.time()), "status": "processed"}
            job["result_files"] = [result]
            self.event(job_id, "The job has successfully completed")


def _error(status: int, message: str, code: str | None = None, param: str | None = None):
    kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}
    return status, {"error": {"message": message, "type": kind.get(status, "server_error"),
                              "param": param, "code": code}}


class Handler(BaseHTTPRequestHandler):
    server_version = "openai-contract/1"
    state: FakeState  # set on the subclass made per server

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/")
        query = dict(parse_qsl(url.query))
        body = self._body() if method == "POST" else b""
        st = self.state
        with st.lock:
            st.requests.append((method, path))
            if self.headers.get("Authorization") != f"Bearer {st.api_key}":
                status, out = _error(401, "Incorrect API key provided.", "invalid_api_key")
            else:
                status, out = self.route(method, path, query, body)
        self._send(status, out)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def route(self, method: str, path: str, query: dict[str, str], body: bytes):
        st = self.state
        parts = path.split("/")[1:]  # ["v1", ...]
        if parts[:1] != ["v1"]:
            return _error(404, f"Invalid URL ({method} {path})")
        parts = parts[1:]
        if parts == ["files"] and method == "POST":
            return self.create_file(body)
        if len(parts) == 2 and parts[0] == "files" and method == "GET":
            f = st.files.get(parts[1])
            return (200, f) if f else _error(404, f"No such File object: {parts[1]}")
        if parts == ["fine_tuning", "jobs"] and method == "POST":
            return self.create_job(body)
        if parts == ["chat", "completions"] and method == "POST":
            return self.chat(body)
        if parts == ["fine_tuning", "jobs"] and method == "GET":
            return self.list_jobs(query)
        if len(parts) >= 3 and parts[:2] == ["fine_tuning", "jobs"]:
            job_id = parts[2]
            if job_id not in st.jobs:
                return _error(404, f"Could not find fine-tune: {job_id}", "fine_tune_not_found")
            if len(parts) == 3 and method == "GET":
                st.advance(job_id)
                return 200, st.jobs[job_id]
            if parts[3:] == ["events"] and method == "GET":
                limit = int(query.get("limit", 20))
                events = sorted(st.events[job_id], key=lambda e: e["id"], reverse=True)[:limit]
                return 200, {"object": "list", "data": events, "has_more": False}
            if parts[3:] == ["cancel"] and method == "POST":
                job = st.jobs[job_id]
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    return _error(400, f"Job {job_id} has already completed.")
                job["status"] = "cancelled"
                st.event(job_id, "Fine-tuning job cancelled")
                return 200, job
        return _error(404, f"Invalid URL ({method} {path})")

    def create_file(self, body: bytes):
        st = self.state
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            return _error(400, "Expected multipart/form-data")
        msg = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + body)
        fields: dict[str, Any] = {}
        filename = None
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if part.get_filename():
                filename = part.get_filename()
            fields[name] = payload
        if (fields.get("purpose") or b"").decode() != "fine-tune":
            return _error(400, "purpose must be 'fine-tune'", param="purpose")
        content = fields.get("file")
        if not content:
            return _error(400, "file is required", param="file")
        for n, line in enumerate(content.decode("utf-8").splitlines(), 1):
            if line.strip() and "messages" not in json.loads(line):
                return _error(400, f"Invalid file format: line {n} has no 'messages'", param="file")
        file_id = st.new_id("file")
        st.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content),
                             "created_at": int(time.time()), "filename": filename,
                             "purpose": "fine-tune", "status": "processed"}
        st.contents[file_id] = content
        return 200, st.files[file_id]

    def create_job(self, body: bytes):
        st = self.state
        try:
            req = json.loads(body)
        except json.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.")
        model = req.get("model")
        if model not in st.models:
            return _error(400, f"Model {model} is not available for fine-tuning or does not exist.",
                          "model_not_available", "model")
        for param in ("training_file", "validation_file"):
            fid = req.get(param)
            if param == "training_file" and not fid:
                return _error(400, "training_file is required", param=param)
            if fid and st.files.get(fid, {}).get("purpose") != "fine-tune":
                return _error(400, f"invalid {param}: {fid}", "invalid_file", param)
        job_id = st.new_id("ftjob")
        hp = ((req.get("method") or {}).get("supervised") or {}).get("hyperparameters") or {}
        st.jobs[job_id] = {
            "object": "fine_tuning.job", "id": job_id, "model": model,
            "created_at": int(time.time()), "finished_at": None, "fine_tuned_model": None,
            "organization_id": "org-contract", "result_files": [], "status": "validating_files",
            "validation_file": req.get("validation_file"), "training_file": req["training_file"],
            "hyperparameters": hp, "trained_tokens": None, "error": None,
            "suffix": req.get("suffix"), "seed": req.get("seed"),
            "metadata": req.get("metadata"), "method": req.get("method"),
        }
        st.events[job_id] = []
        st.steps[job_id] = 0
        st.event(job_id, f"Created fine-tuning job: {job_id}")
        return 200, st.jobs[job_id]

    def chat(self, body: bytes):
        st = self.state
        try:
            req = json.loads(body)
        except json.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.")
        model = req.get("model")
        served = st.models | {j["fine_tuned_model"] for j in st.jobs.values() if j["fine_tuned_model"]}
        if model not in served:
            return _error(404, f"The model `{model}` does not exist or you do not have access to it.",
                          "model_not_found", "model")
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "developer", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            return _error(400, "messages must be a non-empty list of {role, content}", param="messages")
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            return _error(400, "messages must contain a user message", param="messages")
        st.chats.append(req)
        words = f"Draft: {users[-1]}".split()
        limit = req.get("max_completion_tokens") or req.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and limit < len(words):
            words, finish = words[:limit], "length"
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        return 200, {
            "id": st.new_id("chatcmpl"), "object": "chat.completion",
            "created": int(time.time()), "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                         "message": {"role": "assistant", "content": " ".join(words)}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                      "total_tokens": prompt_tokens + len(words)},
        }

    def list_jobs(self, query: dict[str, str]):
        jobs = sorted(self.state.jobs.values(), key=lambda j: j["id"], reverse=True)
        for key, value in query.items():
            if key.startswith("metadata[") and key.endswith("]"):
                jobs = [j for j in jobs if (j.get("metadata") or {}).get(key[9:-1]) == value]
        if "after" in query:
            ids = [j["id"] for j in jobs]
            jobs = jobs[ids.index(query["after"]) + 1:] if query["after"] in ids else []
        limit = int(query.get("limit", 20))
        return 200, {"object": "list", "data": jobs[:limit], "has_more": len(jobs) > limit}


class OpenAIContractServer:
    """``with OpenAIContractServer(...) as srv: srv.base_url`` -> ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, api_key: str = "sk-contract-test", models: set[str] | None = None,
                 fail_models: set[str] | None = None):
        self.state = FakeState(api_key, models or {"gpt-4o-mini-2024-07-18", "broken-model"},
                               fail_models or {"broken-model"})
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
