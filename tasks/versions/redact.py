"""The secret and PII scan, and the redaction of everything a version stores beside its rows.

Exclusions are stored with the version, so their text is always scanned and redacted
(``redact_exclusion``, applied by the writer), whatever the drop reason and the build's scan
policies; ``build.filters`` uses the same patterns to decide what happens to kept rows.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sftflow.tasks.versions.rows import Exclusion

PII_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    # International (+CC ...) or North-American style numbers with separators; 10-15 digits.
    "phone": re.compile(
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,4}"
        r"|\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4})(?![\w])"
    ),
}

SECRET_PATTERNS: dict[str, re.Pattern[str]] = {
    "private_key": re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----)?",
        re.DOTALL,
    ),
    "aws_access_key": re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b"),
    "aws_secret_key": re.compile(
        r"(?i)aws_?secret_?(?:access_?)?key\W{0,3}[=:]\W{0,3}[A-Za-z0-9/+]{40}"
    ),
    "gcp_api_key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    "github_token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})\b"),
    "slack_token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),
    "openai_key": re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}\b"),
    "bearer_token": re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{16,}=*"),
}


def _digits(s: str) -> int:
    return sum(ch.isdigit() for ch in s)


def find_sensitive(text: str, patterns: dict[str, re.Pattern[str]]) -> list[tuple[str, int, int]]:
    """``(kind, start, end)`` of every match; phone matches need 10 to 15 digits."""
    hits = []
    for kind, pattern in patterns.items():
        for m in pattern.finditer(text):
            if kind == "phone" and not 10 <= _digits(m.group()) <= 15:
                continue
            hits.append((kind, m.start(), m.end()))
    return hits


def redact(text: str, hits: list[tuple[str, int, int]]) -> str:
    """Replace each hit by ``[KIND]`` (overlapping hits merge into the first one's label)."""
    out, last = [], 0
    for kind, start, end in sorted(hits, key=lambda h: (h[1], -h[2])):
        if start < last:
            last = max(last, end)
            continue
        out.append(text[last:start])
        out.append(f"[{kind.upper()}]")
        last = end
    out.append(text[last:])
    return "".join(out)


_ALL_PATTERNS = {**SECRET_PATTERNS, **PII_PATTERNS}
_TEXT_FIELDS = ("prompt", "completion", "detail")


def redact_exclusion(ex: Exclusion) -> Exclusion:
    """``ex`` with every secret and PII match in its text fields redacted, whatever its drop
    reason and the scan policies: exclusions are stored with the version (a copy)."""
    out = dict(ex)
    for name in _TEXT_FIELDS:
        text = out.get(name)
        if isinstance(text, str) and text:
            hits = find_sensitive(text, _ALL_PATTERNS)
            if hits:
                out[name] = redact(text, hits)
    return out  # type: ignore[return-value]
