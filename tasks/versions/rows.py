"""The records a dataset version stores, and the Parquet schema derived from them.

``SftRow`` is one SFT example: one (task, annotation) pair as the export reads it, plus what
the split stage adds. It is the one record every build stage passes on (filters, dedup,
split, formats, versions); ``versions.formats`` writes it, and its Parquet columns
(``SCHEMA``) are derived here from the type itself, so the two cannot drift apart.
``Exclusion`` is a row (or task) that did not make it into a version, and why: one line of
the version's ``exclusions.jsonl``.
"""

from __future__ import annotations

import types
import typing
from typing import Literal, TypedDict, Union

import pyarrow as pa

SplitName = Literal["train", "eval"]


class _ExportedRow(TypedDict):
    prompt: str
    completion: str
    prompt_id: str
    task_id: int
    annotation_id: int
    annotator: str  # e-mail or user id of who completed the annotation
    updated_at: str  # ISO 8601, the annotation's last change
    ground_truth: bool
    # None, all three, when the annotation did not start from a model draft (edits.py):
    draft_model: str | None  # model_version (job id) of the prediction the annotator started from
    draft_similarity: float | None  # edits.edit_similarity(draft text, completion)
    draft_unchanged: bool | None  # the completion is the draft, unedited


class SftRow(_ExportedRow, total=False):
    """One SFT example. The export fills the fields above; the split stage adds
    ``cluster_id``, ``split`` and ``row_hash``, and then the row is what a version stores
    (``formats.SCHEMA`` has these columns in this order). A TypedDict: builds move 55k rows."""

    cluster_id: str  # 16 hex digits: the row's own dedup content key
    split: SplitName
    row_hash: str  # formats.row_hash of every other column


class _ExclusionReason(TypedDict):
    stage: Literal["export", "filter", "dedup"]
    reason: str


class Exclusion(_ExclusionReason, total=False):
    """A row (or task) that did not make it into the version, and why; one line of the
    version's ``exclusions.jsonl``. Dedup exclusions carry the kept twin's ``cluster_id``
    instead of the text; filter exclusions have secrets and PII redacted."""

    detail: str
    task_id: int | None
    annotation_id: int | None
    prompt: str | None
    completion: str | None
    cluster_id: str


_ARROW = {str: pa.string(), int: pa.int64(), bool: pa.bool_(), float: pa.float64()}


def _arrow_field(name: str, hint: object) -> pa.Field:
    """One column from one annotation: ``X | None`` is nullable, a ``Literal`` of strings is a
    string, ``NotRequired``/``total=False`` does not make a column nullable (only ``None`` does)."""
    args = typing.get_args(hint)
    nullable = typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args
    if nullable:
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is Literal:
        (hint,) = {type(v) for v in typing.get_args(hint)}
    return pa.field(name, _ARROW[hint], nullable=nullable)


def row_schema(row_type: type) -> pa.Schema:
    """The Parquet schema of a row type: its fields in declaration order (base class first)."""
    hints = typing.get_type_hints(row_type)
    return pa.schema([_arrow_field(name, hint) for name, hint in hints.items()])


#: Columns of every Parquet shard, in this order: the fields of ``SftRow``. The ``draft_*``
#: columns are null on rows whose annotation did not start from a model draft (and a row may
#: leave them out: it means null).
SCHEMA = row_schema(SftRow)
