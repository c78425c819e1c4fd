"""The prompt record and its identity: ``Prompt``, ``Rejected``, ``prompt_id``, the field mapping.

``prompt_id`` is the first 32 hex chars of sha256 of the prompt's normalised text (``normalise``,
the same normalisation as dedup's exact keys). ``to_prompt`` turns one decoded input record into
a ``Prompt`` through a ``FieldMapping`` (where the prompt is) and ``Limits``, or says why it is
``Rejected``. Pure logic: neither Prefect nor services. Reading files is in ``parse``, the
ingest ledger in ``ledger``.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, field_validator

from sftflow.core.hashing import sha256_hex
from sftflow.tasks.dedup import normalize

# -- prompt identity --------------------------------------------------------------------------
# One normalisation for prompt identity and dedup's exact keys: NFKC, casefold, whitespace
# runs collapsed to one space, ends stripped.
normalise = normalize


def prompt_id(text: str) -> str:
    """The stable id of a prompt: first 32 hex chars of sha256 of its normalised text."""
    return sha256_hex(normalise(text).encode("utf-8", "surrogatepass"))[:32]


# -- configuration ----------------------------------------------------------------------------
#: Task data keys written by ingest; ``keep_fields`` may not reuse them.
RESERVED_KEYS = frozenset({"prompt", "prompt_id", "source", "source_etag", "source_row", "ingest_batch"})


class FieldMapping(BaseModel):
    """Where the prompt is in each input record."""

    prompt_field: str = Field("prompt", description="Record field holding the prompt text.")
    input_field: str | None = Field(
        None,
        description="Optional second field joined to the prompt (Alpaca style: prompt_field="
        "'instruction', input_field='input'). Empty or absent input leaves the prompt alone.",
    )
    join_template: str = Field(
        "{prompt}\n\n{input}",
        description="How prompt and input are joined; must contain {prompt} and {input}.",
    )
    keep_fields: list[str] = Field(
        default_factory=list,
        description="Other record fields copied into the Label Studio task data (provenance).",
    )

    @field_validator("join_template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        names = {n for _, n, _, _ in string.Formatter().parse(v) if n is not None}
        if names != {"prompt", "input"}:
            raise ValueError("join_template must use exactly the fields {prompt} and {input}")
        return v

    @field_validator("keep_fields")
    @classmethod
    def _not_reserved(cls, v: list[str]) -> list[str]:
        clash = sorted(set(v) & RESERVED_KEYS)
        if clash:
            raise ValueError(f"keep_fields may not name ingest's own keys: {clash}")
        return v


class Limits(BaseModel):
    max_prompt_chars: int = Field(100_000, gt=0, description="Longer prompts are quarantined.")
    max_depth: int = Field(
        100, gt=0, le=500,
        description="Records nested deeper (arrays and objects) are quarantined as too_deep, "
        "before Python's JSON parser would recurse that far.",
    )
    max_file_bytes: int = Field(
        512 * 2**20, gt=0,
        description="Larger source objects are quarantined without reading; a compressed object "
        "is also cut where its decompressed bytes pass this (the rest is quarantined).",
    )


@dataclass(frozen=True, slots=True)
class Prompt:
    prompt: str
    prompt_id: str
    row: int  # 1-based line (JSONL/CSV, header excluded for CSV) or array/row index + 1
    extra: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    row: int
    reason: str  # invalid_json | invalid_utf8 | not_object | missing_prompt | wrong_type | ...
    detail: str = ""
    raw: str = ""


def raw_preview(raw: Any, limit: int = 500) -> str:
    """What a rejected record's quarantine line shows of it: its text, at most ``limit`` chars."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    elif not isinstance(raw, str):
        raw = json.dumps(raw, default=str, ensure_ascii=False)
    return raw[:limit]


def _jsonable(v: Any) -> Any:
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


#: C0 control characters other than tab, newline and carriage return. U+0000 is refused by
#: Label Studio on PostgreSQL (a 500 for the whole import request); the others are no text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _control_char(text: str) -> str | None:
    """Where the first C0 control character (other than tab/LF/CR) is, if any."""
    m = _CONTROL.search(text)
    return None if m is None else f"U+{ord(m.group()):04X} at char {m.start()}"


def to_prompt(
    record: Any, row: int, mapping: FieldMapping, limits: Limits, raw: Any = None
) -> Prompt | Rejected:
    """Validate one decoded record and build its prompt, or say why it is rejected."""
    if not isinstance(record, dict):
        return Rejected(row, "not_object", type(record).__name__, raw_preview(raw or record))
    text = record.get(mapping.prompt_field)
    if text is None:
        return Rejected(row, "missing_prompt", mapping.prompt_field, raw_preview(raw or record))
    if not isinstance(text, str):
        return Rejected(row, "wrong_type", f"{mapping.prompt_field} is {type(text).__name__}",
                        raw_preview(raw or record))
    if mapping.input_field:
        extra_input = record.get(mapping.input_field)
        if extra_input is not None and not isinstance(extra_input, str):
            return Rejected(row, "wrong_type", f"{mapping.input_field} is {type(extra_input).__name__}",
                            raw_preview(raw or record))
        if extra_input and extra_input.strip():
            text = mapping.join_template.format(prompt=text, input=extra_input)
    if not text.strip():
        return Rejected(row, "empty_prompt", mapping.prompt_field, raw_preview(raw or record))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return Rejected(row, "invalid_utf8", "prompt has undecodable bytes", raw_preview(raw or record))
    if len(text) > limits.max_prompt_chars:
        return Rejected(row, "too_large", f"{len(text)} chars > {limits.max_prompt_chars}",
                        raw_preview(raw or record))
    extra = {f: _jsonable(record.get(f)) for f in mapping.keep_fields} or None
    for name, value in [("prompt", text), *(extra or {}).items()]:
        where = _control_char(value) if isinstance(value, str) else None
        if where:
            return Rejected(row, "control_chars", f"{name}: {where}", raw_preview(raw or record))
    return Prompt(text, prompt_id(text), row, extra)

