"""Named failpoints: crash, fail or stall a process at an exact step, for fault tests.

Code marks the steps where a crash or an error matters with ``failpoint("name")``. A failpoint
does nothing unless activated, either for a subprocess through the environment::

    SFTFLOW_FAILPOINTS="versioning.after-manifest=crash;ingest.after-import=raise@2"

or in-process with ``active({...})``. Actions:

- ``crash``: ``SIGKILL`` the process (no cleanup, no ``finally``: as a power cut or OOM kill);
- ``raise``: raise ``FailpointError`` (an error the code's own handling sees);
- ``sleep(S)``: pause S seconds (a stalled step, e.g. past a lease or a timeout).

``@N`` fires on the N-th hit only (counted per process); without it, on every hit. The idea is
etcd's gofail and TiKV's fail-rs. ``POINTS`` lists every name in the code, so a test cannot
activate a misspelt point without an error.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

ENV = "SFTFLOW_FAILPOINTS"

#: Every failpoint in the code, with where it sits.
POINTS: dict[str, str] = {
    "ingest.after-import": "a batch was sent to Label Studio, before the ledger confirms it",
    "ingest.after-confirm": "the ledger confirmed a batch, before its objects are marked",
    "versioning.after-shard": "a shard is uploaded, before the version's other files",
    "versioning.after-files": "the version's files are uploaded, before its manifest",
    "versioning.after-manifest": "the manifest is written, before refs/latest moves",
    "versioning.after-ref": "refs/latest moved, before the build reports and emits its event",
    "finetune.after-submit": "a job was submitted, before the lineage record names it",
    "finetune.after-lineage": "the lineage record is written, before the job is watched",
    "finetune.train-step": "a training step ended (the N-th with @N), before the next one",
    "gc.before-delete": "gc listed its garbage, before deleting it",
}

_SPEC = re.compile(r"^(crash|raise|sleep\((\d+(?:\.\d+)?)\))(?:@(\d+))?$")


class FailpointError(RuntimeError):
    """Raised by an activated ``raise`` failpoint."""


@dataclass(frozen=True)
class Action:
    kind: str  # crash | raise | sleep
    seconds: float = 0.0
    nth: int | None = None


def parse(spec: str) -> dict[str, Action]:
    """``"a=crash;b=sleep(2)@3"`` -> actions by name; unknown names or actions raise."""
    out: dict[str, Action] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, action = part.partition("=")
        name = name.strip()
        if name not in POINTS:
            raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(sorted(POINTS))}")
        m = _SPEC.match(action.strip())
        if not m:
            raise ValueError(f"failpoint {name}: bad action {action!r} "
                             "(crash | raise | sleep(SECONDS), optionally @N)")
        kind = m.group(1).split("(")[0]
        out[name] = Action(kind, float(m.group(2) or 0), int(m.group(3)) if m.group(3) else None)
    return out


_lock = threading.Lock()
_hits: Counter[str] = Counter()
_override: dict[str, Action] | None = None
_env_cache: tuple[str, dict[str, Action]] = ("", {})


def _actions() -> dict[str, Action]:
    global _env_cache
    if _override is not None:
        return _override
    raw = os.environ.get(ENV, "")
    if raw != _env_cache[0]:
        _env_cache = (raw, parse(raw))
    return _env_cache[1]


def failpoint(name: str) -> None:
    """Mark a step. Does nothing unless ``name`` is activated (see the module docstring)."""
    actions = _actions()
    if not actions:
        return
    action = actions.get(name)
    if action is None:
        return
    with _lock:
        _hits[name] += 1
        hit = _hits[name]
    if action.nth is not None and hit != action.nth:
        return
    if action.kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is not instant; never run the next step
    if action.kind == "raise":
        raise FailpointError(f"failpoint {name} (hit {hit})")
    time.sleep(action.seconds)


@contextlib.contextmanager
def active(actions: Mapping[str, str]) -> Iterator[None]:
    """Activate failpoints in this process for the block: ``{"name": "raise@2"}``."""
    global _override
    parsed = parse(";".join(f"{k}={v}" for k, v in actions.items()))
    with _lock:
        previous, _override = _override, parsed
        _hits.clear()
    try:
        yield
    finally:
        with _lock:
            _override = previous
            _hits.clear()
