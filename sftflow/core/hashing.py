"""The one content hash: sha256 over bytes, and over canonical JSON for configurations.

Canonical JSON is sorted keys, no whitespace, UTF-8 (not ``\\u`` escapes), ``str()`` for what
JSON cannot hold. Dataset version ids, model job names and prompt ids all derive from it, so
changing it changes every id: don't.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode()


def config_hash(config: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the sha256 of ``config`` as canonical JSON."""
    return sha256_hex(canonical_json(config))[:length]
