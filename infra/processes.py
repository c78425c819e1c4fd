"""Process groups, pid records and ports of the local stack's services (``infra/stack.py``).

A service runs as its own process group; its pid file holds a :class:`_PidRecord` (the pid and
its start time, which guards against pid reuse). ``port_in_use`` checks a port the way the
services bind it; ``_bin`` finds an executable of the app's virtual environment.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sftflow.core.errors import SftflowError


@dataclass
class ServiceSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    url: str
    ports: list[int]
    health: Callable[[], None]  # raises when not healthy
    stop_signal: int = signal.SIGTERM
    after_stop: Callable[[], None] = lambda: None
    before_start: Callable[[], None] = lambda: None
    #: Run as this system user (uid, gid), else as ourselves.
    run_as: tuple[int, int] | None = None


@dataclass
class ServiceStatus:
    name: str
    url: str
    healthy: bool
    pid: int | None
    managed: bool  # started by this stack folder (pid file), not found running elsewhere
    log: str
    detail: str = ""
    #: "healthy", "down" (no answer), or "failing" (answers, but its services log errors)
    state: str = "down"


@dataclass
class _PidRecord:
    pid: int
    start_ticks: int
    argv: list[str] = field(default_factory=list)
    #: The database backend a service was started with ("sqlite" or "postgresql"; "" for
    #: services without one, and in pid files written before the postgres profile existed).
    db: str = ""


def _start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks (guards against pid reuse), None if gone/zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not listen on ``port`` now. A bind test with SO_REUSEADDR, as the
    services set it: it sees a listener, and also an outgoing connection that holds the port
    as its source (a connect test misses that one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def ephemeral_port_range() -> tuple[int, int]:
    """The range the kernel picks outgoing connections' source ports from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def weed_grpc_port(port: int) -> int:
    """SeaweedFS serves gRPC on each HTTP port + 10000; the stack passes it explicitly so that
    every port it listens on is checked before the start."""
    return port + 10000


def _log_excerpt(text: str, lines: int = 3) -> str:
    """The last error-looking lines of a service's log (a Go panic's goroutine dump tail says
    nothing; its `F1205 ...` line does)."""
    flagged = [ln.strip() for ln in text.splitlines()
               if re.search(r"(?i)\b(error|fatal|failed|exception)\b|^F\d{4} ", ln.strip())]
    return " | ".join((flagged or [ln.strip() for ln in text.splitlines() if ln.strip()])[-lines:])[:600]


def _bin(name: str, configured: Path | None = None) -> str:
    if configured is not None and configured.exists():
        return str(configured.resolve())
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    where = f" (looked at {configured})" if configured else ""
    raise SftflowError(f"'{name}' executable not found{where}; run `make install` first")
