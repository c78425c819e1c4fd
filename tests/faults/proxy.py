"""A fault-injecting HTTP proxy for tests, in the spirit of Toxiproxy, on asyncio.

Put it between sftflow and a real service (Label Studio, SeaweedFS) and tell it which requests
to hurt (optionally only requests whose body, or whose header lines, match a regex). Requests
and responses are forwarded byte for byte (S3 signatures stay valid); only the
``Expect: 100-continue`` handshake is answered by the proxy itself. Faults, matched on method
and a path regex, each for the first ``times`` matching requests (``times=0``: all of them):

- ``delay``: hold the request ``seconds`` before forwarding it;
- ``slow_response``: forward it, let the server do the work, and hold the answer ``seconds``
  (past a client's timeout: the outcome is unknown to the client, yet the work is done);
- ``lose_response``: forward it, then answer ``status`` (e.g. 504, as a gateway would) or,
  with ``status=None``, reset the connection; the server did the work either way;
- ``status``: answer ``status`` without forwarding (the server never sees the request);
- ``reset``: reset the connection without forwarding;
- ``rewrite``: forward it; when the server answers ``from_status``, answer ``status`` instead
  (e.g. 412 -> 200: a server that ignores conditional writes, as far as the client can tell).

``FaultProxy`` runs its own event loop in a thread; ``applied`` counts the faults by kind.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Self

Kind = Literal["delay", "slow_response", "lose_response", "status", "reset", "rewrite"]
_REASONS = {200: "OK", 412: "Precondition Failed", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass
class Fault:
    kind: Kind
    method: str | None = None
    path: str | None = None  # regex searched in the request target (path and query)
    times: int = 1
    seconds: float = 0.0
    status: int | None = 503
    from_status: int | None = None
    body: bytes | None = None  # regex searched in the request body
    #: regex searched in the request's header lines, ignoring case, ``^`` at each line
    #: (``r"^if-match:"``: only requests carrying If-Match)
    header: str | None = None

    def matches(self, method: str, target: str, body: bytes = b"", head: str = "") -> bool:
        return ((self.method is None or self.method == method)
                and (self.path is None or re.search(self.path, target) is not None)
                and (self.body is None or re.search(self.body, body) is not None)
                and (self.header is None
                     or re.search(self.header, head, re.IGNORECASE | re.MULTILINE) is not None))


@dataclass
class _Message:
    head: bytes  # start line and headers, with the final CRLF CRLF
    body: bytes
    start: str
    headers: dict[str, str]


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, str, dict[str, str]] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return head, lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], *,
                     until_close: bool) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                out += await reader.readuntil(b"\r\n")  # no trailers from our peers
                return bytes(out)
            out += await reader.readexactly(size + 2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read() if until_close else b""


def _response(status: int, body: bytes = b"") -> bytes:
    reason = _REASONS.get(status, "Fault")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: text/plain\r\nConnection: close\r\n\r\n").encode() + body


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.faults: list[Fault] = []
        self.applied: Counter[str] = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, self.host, 0), self._loop)
        self._server = fut.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take(self, method: str, target: str, body: bytes = b"", head: str = "") -> Fault | None:
        with self._lock:
            self.requests += 1
            for fault in self.faults:
                if fault.matches(method, target, body, head):
                    if fault.times > 0:
                        fault.times -= 1
                        if fault.times == 0:
                            self.faults.remove(fault)
                    self.applied[fault.kind] += 1
                    return fault
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                got = await _read_head(reader)
                if got is None:
                    return
                head, start, headers = got
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                    head = re.sub(rb"(?im)^expect:[^\r\n]*\r\n", b"", head)
                body = await _read_body(reader, headers, until_close=False)
                method, target = (start.split(" ") + ["", ""])[:2]
                fault = self._take(method, target, body, head.decode("latin-1"))
                if fault and fault.kind == "reset":
                    writer.transport.abort()
                    return
                if fault and fault.kind == "status":
                    writer.write(_response(fault.status or 503, b"injected by FaultProxy"))
                    await writer.drain()
                    return
                if fault and fault.kind == "delay":
                    await asyncio.sleep(fault.seconds)  # the injected fault: a slow request
                if upstream is None:
                    upstream = await asyncio.open_connection(*self.upstream)
                upstream[1].write(head + body)
                await upstream[1].drain()
                response = await self._read_response(upstream[0], method)
                if response is None:
                    writer.transport.abort()
                    return
                if response.headers.get("connection", "").lower() == "close":
                    upstream[1].close()
                    upstream = None
                if fault and fault.kind == "lose_response":
                    if fault.status is None:
                        writer.transport.abort()
                    else:
                        writer.write(_response(fault.status, b"response lost by FaultProxy"))
                        await writer.drain()
                        writer.close()
                    return
                if fault and fault.kind == "slow_response":
                    await asyncio.sleep(fault.seconds)  # the injected fault: a held answer
                status = int(response.start.split(" ")[1])
                if fault and fault.kind == "rewrite" and status == fault.from_status:
                    writer.write(_response(fault.status or 200))
                    await writer.drain()
                    writer.close()
                    return
                writer.write(response.head + response.body)
                await writer.drain()
                if response.headers.get("connection", "").lower() == "close":
                    writer.close()  # the body ended with the server's close: so does ours
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            writer.transport.abort()
        finally:
            if upstream is not None:
                upstream[1].close()
            if not writer.is_closing():
                writer.close()

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader, method: str) -> _Message | None:
        while True:
            got = await _read_head(reader)
            if got is None:
                return None
            head, start, headers = got
            status = int(start.split(" ")[1])
            if status != 100:  # an upstream 100 Continue is ours to skip
                break
        no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        # a response with neither a length nor chunks ends when the server closes (a stream)
        body = b"" if no_body else await _read_body(reader, headers, until_close=True)
        if not no_body and "content-length" not in headers and "chunked" not in headers.get(
                "transfer-encoding", "").lower():
            headers["connection"] = "close"
        return _Message(head, body, start, headers)
