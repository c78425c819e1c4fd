"""What a dataset version is made of, as bytes: Parquet shards, OpenAI chat JSONL, TRL
prompt/completion JSONL and a Hugging Face dataset card. Pure functions, deterministic output.

Parquet shards are byte-identical for identical rows (pinned writer options, no timestamps in
the file), which is what lets versions share content-addressed shards.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from sftflow.core.hashing import sha256_hex
from sftflow.tasks.versions.hub import hf_split, written_source
from sftflow.tasks.versions.rows import SCHEMA

if TYPE_CHECKING:
    from sftflow.tasks.versions.rows import Exclusion, SftRow

COLUMNS = tuple(SCHEMA.names)
_OPTIONAL = frozenset(f.name for f in SCHEMA if f.nullable)

_PARQUET_OPTIONS = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": ["prompt_id", "annotator", "split", "cluster_id", "draft_model"],
    "write_statistics": False,
    "version": "2.6",
    "data_page_version": "1.0",
    "store_schema": True,
}


def _cell(row: SftRow, column: str) -> Any:
    return row.get(column) if column in _OPTIONAL else row[column]  # type: ignore[literal-required]


def row_hash(row: SftRow) -> str:
    """Content hash of one stored row: every column but ``row_hash`` itself (32 hex chars)."""
    payload = json.dumps([_cell(row, c) for c in COLUMNS if c != "row_hash"], ensure_ascii=False,
                         separators=(",", ":"))
    return sha256_hex(payload.encode("utf-8", "surrogatepass"))[:32]


def schema_json() -> dict[str, str]:
    return {f.name: str(f.type) for f in SCHEMA}


def parquet_bytes(rows: Sequence[SftRow]) -> bytes:
    """One Parquet file (one row group) holding ``rows`` in the given order."""
    table = pa.Table.from_pylist([{c: _cell(r, c) for c in COLUMNS} for r in rows], schema=SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=max(1, len(rows)), **_PARQUET_OPTIONS)
    return sink.getvalue()


def _jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(
        json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
        + b"\n"
        for r in records
    )


def openai_chat_jsonl(rows: Iterable[SftRow], system_prompt: str | None = None) -> bytes:
    """OpenAI fine-tuning chat format: ``{"messages": [system?, user, assistant]}`` a line."""

    def messages(r: SftRow) -> dict[str, Any]:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        msgs += [{"role": "user", "content": r["prompt"]},
                 {"role": "assistant", "content": r["completion"]}]
        return {"messages": msgs}

    return _jsonl(messages(r) for r in rows)


def trl_jsonl(rows: Iterable[SftRow]) -> bytes:
    """TRL's standard prompt-completion format: ``{"prompt": ..., "completion": ...}``."""
    return _jsonl({"prompt": r["prompt"], "completion": r["completion"]} for r in rows)


def exclusions_jsonl(rows: Iterable[Exclusion]) -> bytes:
    """The version's ``exclusions.jsonl``: every secret and PII match in the text redacted
    (export-stage exclusions copy the raw prompt; filter drops for any reason keep theirs)."""
    from sftflow.tasks.versions.redact import redact_exclusion

    return _jsonl(redact_exclusion(r) for r in rows)


_HF_DTYPES = {pa.int64(): "int64", pa.bool_(): "bool", pa.float64(): "float64"}


def drafts_section(drafts: dict[str, Any]) -> list[str]:
    """Markdown lines on model drafts (``stats["drafts"]``, made by
    ``sftflow.tasks.drafts.figures.draft_figures``): acceptance and edit similarity per
    drafting model, the training policy, annotator agreement and who is flagged."""
    head = (f"Rows from model drafts: {drafts.get('drafted_rows', 0)} of "
            f"{drafts.get('rows', 0)}. Training policy for drafts accepted unchanged: "
            f"**{drafts.get('policy')}** ({drafts.get('excluded', 0)} rows excluded). "
            f"{drafts.get('policy_reason', '')}")
    lines = [head, ""]
    models = drafts.get("models") or {}
    if models:
        lines += [
            ("| drafting model | rows | accepted unchanged | acceptance rate | mean similarity "
             "| mean similarity when edited |"),
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *[(f"| `{m}` | {f['rows']} | {f['accepted_unchanged']} | "
               f"{_num(f['acceptance_rate'])} | {_num(f['mean_similarity'])} | "
               f"{_num(f['mean_similarity_edited'])} |") for m, f in models.items()],
            "",
            ("Similarity: normalised Levenshtein similarity of the submitted response to the "
             "draft (1 = unchanged)."),
            "",
        ]
    agreement = drafts.get("agreement") or {}
    if agreement.get("pairs"):
        flagged = ", ".join(agreement.get("flagged") or []) or "none"
        lines += [
            (f"Annotator agreement (mean pairwise similarity over {agreement['tasks']} tasks "
             f"with several annotators, {agreement['pairs']} pairs): "
             f"{_num(agreement['mean_similarity'])}."),
            "",
            "| annotator | pairs | mean similarity | robust z | flagged |",
            "| --- | ---: | ---: | ---: | --- |",
            *[(f"| {a} | {f['pairs']} | {_num(f['mean_similarity'])} | {_num(f['robust_z'])} "
               f"| {'**yes**' if f['flagged'] else ''} |")
              for a, f in (agreement.get("annotators") or {}).items()],
            "",
            f"Flagged for review: {flagged} ({agreement.get('method', '')}).",
            "",
        ]
    ret = drafts.get("return") or {}
    return lines + (draft_return_section(ret) if ret.get("models") else [])


def _s(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def draft_return_section(ret: dict[str, Any]) -> list[str]:
    """Markdown lines on the seconds drafts saved (``stats["drafts"]["return"]``, made by
    ``sftflow.tasks.build.draft_return.draft_return``): per drafting model and per annotator,
    acceptance beside; annotations without ``lead_time`` counted apart."""
    untimed = ret.get("untimed") or {}
    base, period = ret.get("baseline") or {}, ret.get("period") or {}
    lines = [
        (f"Draft return, from Label Studio's `lead_time` (seconds in the editor) over "
         f"{ret.get('annotations', 0)} annotations read from {period.get('from', '-')} to "
         f"{period.get('to', '-')}: without a draft median {_s(base.get('median_s'))} s "
         f"({base.get('annotations', 0)} annotations), with one "
         f"{_s((ret.get('drafted') or {}).get('median_s'))} s; saved in total "
         f"{_s(ret.get('saved_total_s')) or '-'} s. "
         f"{sum(untimed.values())} annotation(s) without lead_time (made through the API, not "
         f"in the editor: {untimed.get('drafted', 0)} drafted, {untimed.get('undrafted', 0)} "
         f"not) are counted apart, never guessed."),
        "",
    ]
    head = ("| {} | drafted | without lead_time | compared | median with draft (s) | median "
            "without (s) | saved per task (s) | saved in total (s) | acceptance rate | mean "
            "similarity |")
    for title, key in (("drafting model", "models"), ("annotator", "annotators")):
        groups = ret.get(key) or {}
        if groups:
            lines += [head.format(title), "| --- |" + " ---: |" * 9, *[
                (f"| `{name}` | {f['annotations']} | {f['untimed']} | {f['compared']} | "
                 f"{_s(f['median_with_draft_s'])} | {_s(f['median_without_draft_s'])} | "
                 f"{_s(f['saved_per_task_s'])} | {_s(f['saved_total_s'])} | "
                 f"{_num(f.get('acceptance_rate'))} | {_num(f.get('mean_similarity'))} |")
                for name, f in groups.items()], ""]
    lines += [(f"Method: {ret.get('method', '')}; prompt-length buckets from "
               f"{ret.get('bucket_edges')} characters."), ""]
    return lines


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def dataset_card(
    *,
    dataset: str,
    version: str,
    rows: dict[str, int],
    sizes: dict[str, int],
    stats: dict[str, Any],
    source: dict[str, Any],
    config: dict[str, Any],
) -> str:
    """The card stored with a version: a README.md with Hugging Face YAML front matter whose
    ``data_files`` and split names (``train``, ``validation``) are those of the Hub layout of
    ``sftflow datasets pull`` (``tasks/versions/hub.py``, which writes the pulled folder's fuller card).
    The JSONL copies (``openai/<split>/``, ``trl/<split>/``) are not configs: ``datasets``
    infers one file format per repository."""
    splits = [s for s in ("train", "eval") if rows.get(s)]
    lines = ["---", "configs:", "- config_name: default", "  default: true", "  data_files:"]
    for s in splits:
        lines += [f"  - split: {hf_split(s)}", f"    path: data/{hf_split(s)}/*.parquet"]
    lines += ["dataset_info:", "  features:"]
    for f in SCHEMA:
        lines += [f"  - name: {f.name}", f"    dtype: {_HF_DTYPES.get(f.type, 'string')}"]
    lines += ["  splits:"]
    for s in splits:
        lines += [f"  - name: {hf_split(s)}", f"    num_examples: {rows[s]}",
                  f"    num_bytes: {sizes.get(s, 0)}"]
    lines += [f"pretty_name: {_yaml_str(dataset)}", "task_categories:", "- text-generation",
              "tags:", "- sft", "- sftflow", "---", ""]
    body = [
        f"# {dataset} @ {version}",
        "",
        ("Supervised fine-tuning pairs written by annotators in Label Studio, filtered, "
        "deduplicated and split by dedup cluster (no near-duplicate straddles train and eval)."),
        "",
        "| split | rows | parquet bytes |",
        "| --- | ---: | ---: |",
        *[f"| {hf_split(s)} | {rows[s]} | {sizes.get(s, 0)} |" for s in splits],
        "",
        "## Source",
        "",
        *[f"- {k}: {v}" for k, v in written_source(source).items()],
        "",
        *(["## Model drafts", "", *drafts_section(stats["drafts"])] if stats.get("drafts") else []),
        "## What was kept and dropped",
        "",
        "```json",
        json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False),
        "```",
        "",
        "## Build configuration",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False),
        "```",
        "",
        ("Formats: `data/` Parquet (all columns, lineage included), `openai/` chat JSONL "
        "(`{\"messages\": [...]}`), `trl/` prompt/completion JSONL, one file per shard in "
        "`<format>/<split>/`: load those with `load_dataset(\"json\", data_files=...)`."),
        "",
    ]
    return "\n".join(lines + body)
