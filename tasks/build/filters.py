"""Row filters and the PII / secret scan: pure functions over lists of ``SftRow``.

Every dropped row comes back as an exclusion with its reason, every decision is counted, so
the build can report what it kept and why it dropped the rest. Exclusions are stored with the
version, so their text is always scanned and redacted (``redact_exclusion``, also applied by
the writer to the export stage's exclusions), whatever the drop reason and the scan policies;
the scan policies decide only what happens to kept rows. ``filter_rows`` is applied per
shard (a Prefect task mapped over shards by the build flow).

Token counts are approximate: UTF-8 bytes / 4, which is close to BPE tokenisers for English
(about 4 bytes a token) and for CJK text (3 bytes a character, about one token a character).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from sftflow.tasks.runtime.declare import compute_task
from sftflow.tasks.versions.redact import (
    PII_PATTERNS,
    SECRET_PATTERNS,
    find_sensitive,
    redact,
    redact_exclusion,
)

if TYPE_CHECKING:
    from sftflow.tasks.versions.rows import Exclusion, SftRow

ScanPolicy = Literal["drop", "redact", "off"]


class FilterConfig(BaseModel):
    min_chars: int = Field(1, ge=0, description="Responses shorter than this (characters) are dropped.")
    max_chars: int = Field(20_000, ge=1, description="Prompt or response longer than this is dropped.")
    min_tokens: int = Field(0, ge=0, description="Responses with fewer approximate tokens are dropped.")
    max_tokens: int = Field(
        4_096, ge=1, description="Prompt + response with more approximate tokens are dropped."
    )
    drop_equal_to_prompt: bool = Field(True, description="Drop responses that repeat the prompt.")
    drop_control_chars: bool = Field(
        True, description="Drop rows with control characters (other than tab and newlines)."
    )
    pii: ScanPolicy = Field(
        "redact", description="E-mail addresses and phone numbers: drop the row, redact, or off."
    )
    secrets: ScanPolicy = Field(
        "drop",
        description="Cloud keys, private keys, bearer and API tokens: drop the row, redact, or off.",
    )


# -- scanners ------------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

def approx_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / 4)


# -- the filter ----------------------------------------------------------------------------------
@dataclass
class FilterResult:
    kept: list[SftRow] = field(default_factory=list)
    excluded: list[Exclusion] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # "dropped:<reason>", "redacted:<kind>"


def _drop_reason(row: SftRow, cfg: FilterConfig) -> str | None:
    prompt, completion = row["prompt"], row["completion"]
    stripped = completion.strip()
    if not stripped:
        return "empty_response"
    if cfg.drop_equal_to_prompt and " ".join(stripped.casefold().split()) == " ".join(
        prompt.strip().casefold().split()
    ):
        return "response_equals_prompt"
    if len(stripped) < cfg.min_chars:
        return "too_short_chars"
    if len(prompt) > cfg.max_chars or len(completion) > cfg.max_chars:
        return "too_long_chars"
    if approx_tokens(completion) < cfg.min_tokens:
        return "too_short_tokens"
    if approx_tokens(prompt) + approx_tokens(completion) > cfg.max_tokens:
        return "too_long_tokens"
    if cfg.drop_control_chars and (_CONTROL.search(prompt) or _CONTROL.search(completion)):
        return "control_characters"
    return None


def _scan(row: SftRow, kinds: dict[str, re.Pattern[str]], policy: ScanPolicy,
          family: str, counts: Counter) -> str | None:
    """Apply one scan family to prompt and completion; returns a drop reason or None."""
    if policy == "off":
        return None
    found = {name: find_sensitive(row[name], kinds) for name in ("prompt", "completion")}
    if not any(found.values()):
        return None
    kinds_found = sorted({h[0] for hits in found.values() for h in hits})
    if policy == "drop":
        return f"{family}:{kinds_found[0]}"
    for name, hits in found.items():
        if hits:
            row[name] = redact(row[name], hits)
    for kind in kinds_found:
        counts[f"redacted:{kind}"] += 1
    return None


def filter_rows(rows: list[SftRow], cfg: FilterConfig) -> FilterResult:
    """Keep, redact or drop each row. Rows are copied, never changed in place."""
    out = FilterResult()
    for row in rows:
        row = row.copy()
        reason = _drop_reason(row, cfg)
        if reason is None:
            reason = _scan(row, SECRET_PATTERNS, cfg.secrets, "secret", out.counts)
        if reason is None:
            reason = _scan(row, PII_PATTERNS, cfg.pii, "pii", out.counts)
        if reason is None:
            out.kept.append(row)
            continue
        out.counts[f"dropped:{reason}"] += 1
        excluded: Exclusion = {
            "stage": "filter", "reason": reason, "detail": "",
            "task_id": row.get("task_id"), "annotation_id": row.get("annotation_id"),
            "prompt": row["prompt"], "completion": row["completion"],
        }
        out.excluded.append(redact_exclusion(excluded))
    out.counts["kept"] += len(out.kept)
    return out


# -- the draft policy: rows that are a model's draft accepted unchanged -------------------------
DraftPolicy = Literal["include", "exclude"]

#: What becomes of rows whose response is a model's draft accepted unchanged.
DEFAULT_DRAFT_POLICY: DraftPolicy = "exclude"
POLICY_REASON = (
    "Default 'exclude': a response accepted unchanged is the drafting model's own output, and "
    "no model is trained on its own unedited outputs unless someone decides so "
    "(draft_policy='include')."
)
#: The exclusion reason of a row dropped by the 'exclude' policy.
EXCLUDED_REASON = "accepted_draft_unchanged"

def is_accepted_unchanged(row: SftRow) -> bool:
    return bool(row.get("draft_unchanged"))


def apply_draft_policy(
    rows: Iterable[SftRow], policy: DraftPolicy = DEFAULT_DRAFT_POLICY,
) -> tuple[list[SftRow], list[Exclusion]]:
    """The rows a version keeps under ``policy``, and the exclusions: under 'exclude', every
    row whose response is a draft accepted unchanged (stage ``filter``, reason
    ``accepted_draft_unchanged``, the drafting model in ``detail``); under 'include', none."""
    if policy not in ("include", "exclude"):
        raise ValueError(f"draft policy must be 'include' or 'exclude', not {policy!r}")
    kept: list[SftRow] = []
    excluded: list[Exclusion] = []
    for row in rows:
        if policy == "exclude" and is_accepted_unchanged(row):
            excluded.append({
                "stage": "filter", "reason": EXCLUDED_REASON,
                "detail": f"draft of {row.get('draft_model')} accepted unchanged; "
                          "draft_policy=exclude",
                "task_id": row["task_id"], "annotation_id": row["annotation_id"],
                "prompt": None, "completion": None,
            })
        else:
            kept.append(row)
    return kept, excluded



#: ``filter_rows`` as a Prefect task, mapped over shards by the build flow.
filter_rows_task = compute_task(name="filter-shard")(filter_rows)
