"""A dataset version laid out as a Hugging Face Hub dataset repository, on disk.

``sftflow datasets pull`` (``pull.pull_version``) writes::

    README.md                         the dataset card (``huggingface_hub.DatasetCard``)
    data/train/<sha256>.parquet       the Parquet shards, one folder per HF split
    data/validation/<sha256>.parquet  (sftflow's ``eval`` split is HF's ``validation``)
    openai/<split>/<sha256>.jsonl     OpenAI chat JSONL copies (not configs of the card)
    trl/<split>/<sha256>.jsonl        TRL prompt/completion JSONL copies (idem)
    exclusions.jsonl                  every dropped row with its reason
    manifest.json                     the version's manifest

so that ``datasets.load_dataset(folder)`` loads ``train`` and ``validation`` with no other
argument (the card's YAML ``configs`` name the Parquet files: ``datasets`` infers one format
per repository, so the JSONL copies stay outside the configs), and
``huggingface-cli upload <repo> <folder> --repo-type dataset`` publishes it as is.

The card's metadata is real: size category from the row count, languages detected over the
rows (``py3langid`` over up to ``LANGUAGE_SAMPLE`` rows, prompt and response together; a
language must hold ``LANGUAGE_MIN_SHARE`` of the sample to be listed), the license from
``SFTFLOW_DATASETS__LICENSE`` (default ``other``: nobody declared one), the source project
(``manifest.source``, every URL in it without credentials: ``written_source``), the lineage
(dataset version id, parent version, config hash, build time) and figures (rows and bytes
per split, drops by stage and reason from ``manifest.stats``).

This module reads the manifest by its attributes only (``pull`` imports it, not the
other way round).
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from sftflow.core.urls import redact_url

#: sftflow split -> the name HF users expect.
HF_SPLITS = {"train": "train", "eval": "validation"}
#: The card's license when none is configured: HF's id for "a license not in the list /
#: not declared"; set ``SFTFLOW_DATASETS__LICENSE`` (e.g. ``cc-by-4.0``) to declare one.
DEFAULT_LICENSE = "other"
LANGUAGE_SAMPLE = 2000
LANGUAGE_MIN_SHARE = 0.05
CARD = "README.md"
_JSONL_FOLDERS = {"openai_chat": "openai", "trl": "trl"}
#: HF's ``size_categories`` values, by upper bound of the row count.
_SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
          (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
          (1_000_000_000, "100M<n<1B"), (10_000_000_000, "1B<n<10B")]


class _File(Protocol):
    path: str
    split: str | None
    format: str
    size: int
    rows: int


class _Version(Protocol):
    """What the card reads of a ``manifest.Manifest``."""

    dataset: str
    version: str
    parent: str | None
    created_at: str
    files: Sequence[_File]
    rows: dict[str, int]
    source: dict[str, Any]
    stats: dict[str, Any]
    config: dict[str, Any]
    config_hash: str
    code_version: str

    @property
    def schema_(self) -> dict[str, str]: ...


def hf_split(split: str) -> str:
    return HF_SPLITS.get(split, split)


def local_path(f: _File) -> str | None:
    """Where a manifest file goes in the Hub layout; None for the stored card (the pulled
    folder's ``README.md`` is the card ``write_card`` builds)."""
    name = posixpath.basename(f.path)
    if f.format == "card":
        return None
    if f.format == "parquet":
        return f"data/{hf_split(f.split or '')}/{name}"
    if f.format in _JSONL_FOLDERS:
        return f"{_JSONL_FOLDERS[f.format]}/{hf_split(f.split or '')}/{name}"
    if f.format in ("minhash", "tasks"):
        return None  # the build's own bookkeeping: signatures and the task index
    if f.format == "exclusions" and f.path.startswith("index/"):
        return f"exclusions/{name}"  # chunks by task id
    return name


def pulled_files(files: Iterable[_File]) -> list[_File]:
    """The manifest files a pull downloads (all but the stored card and the build's own
    signatures and task index)."""
    return [f for f in files if local_path(f) is not None]


def size_category(rows: int) -> str:
    """HF's ``size_categories`` value for a row count."""
    return next((label for bound, label in _SIZES if rows < bound), "n>1T")


def detect_languages(texts: Iterable[str], *, sample: int = LANGUAGE_SAMPLE,
                     min_share: float = LANGUAGE_MIN_SHARE) -> dict[str, int]:
    """ISO 639-1 code -> rows, over the first ``sample`` texts, for the languages holding at
    least ``min_share`` of them (one misdetected short row does not make a language). Empty
    when ``py3langid`` is not installed (the card then names no language)."""
    try:
        import py3langid
    except ImportError:
        return {}
    counts: Counter[str] = Counter()
    for i, text in enumerate(texts):
        if i >= sample:
            break
        if text.strip():
            counts[py3langid.classify(text)[0]] += 1
    total = sum(counts.values())
    return {lang: n for lang, n in counts.most_common() if total and n / total >= min_share}


def drops_by_reason(stats: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """(stage, reason, rows) of every drop the build recorded: counters named
    ``dropped:<reason>`` / ``excluded:<reason>`` and ``dropped`` mappings, per stage."""
    out = []
    for stage, figures in stats.items():
        if not isinstance(figures, Mapping):
            continue
        for key, value in figures.items():
            if key == "dropped" and isinstance(value, Mapping):
                out += [(stage, str(r), int(n)) for r, n in value.items() if isinstance(n, int)]
            elif isinstance(value, int) and key.partition(":")[0] in ("dropped", "excluded"):
                out.append((stage, key.partition(":")[2], value))
    return out


def _dtype(arrow_type: str) -> str:
    return {"bool": "bool", "int64": "int64", "double": "float64"}.get(arrow_type, "string")


def card_data(manifest: _Version, *, license: str = DEFAULT_LICENSE,
              languages: Mapping[str, int] | None = None) -> Any:
    """The card's YAML metadata as ``huggingface_hub.DatasetCardData``."""
    from huggingface_hub import DatasetCardData

    splits = [s for s in HF_SPLITS if manifest.rows.get(s)]
    sizes = {s: sum(f.size for f in manifest.files if f.format == "parquet" and f.split == s)
             for s in splits}
    return DatasetCardData(
        pretty_name=manifest.dataset,
        license=license or DEFAULT_LICENSE,
        language=sorted(languages) if languages else None,
        size_categories=[size_category(sum(manifest.rows.values()))],
        task_categories=["text-generation"],
        tags=["sft", "sftflow"],
        configs=[{"config_name": "default", "default": True, "data_files": [
            {"split": hf_split(s), "path": f"data/{hf_split(s)}/*.parquet"} for s in splits]}],
        dataset_info={
            "features": [{"name": k, "dtype": _dtype(v)} for k, v in manifest.schema_.items()],
            "splits": [{"name": hf_split(s), "num_examples": manifest.rows[s],
                        "num_bytes": sizes[s]} for s in splits],
        },
        sftflow={
            "dataset": manifest.dataset, "version": manifest.version, "parent": manifest.parent,
            "config_hash": manifest.config_hash, "created_at": manifest.created_at,
            "code_version": manifest.code_version or None,
            "source": {k: v for k, v in written_source(manifest.source).items() if _scalar(v)},
        },
    )


def written_source(source: Mapping[str, Any]) -> dict[str, Any]:
    """A version's ``source`` as a card writes it: every URL in it without credentials
    (``redact_url``; a version written before URLs were redacted may hold some)."""
    return {k: redact_url(v) if isinstance(v, str) and "://" in v else v
            for k, v in source.items()}


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def build_card(manifest: _Version, *, license: str = DEFAULT_LICENSE,
               languages: Mapping[str, int] | None = None) -> Any:
    """The version's ``huggingface_hub.DatasetCard``: metadata and a body with lineage and
    figures."""
    from huggingface_hub import DatasetCard

    data = card_data(manifest, license=license, languages=languages)
    m = manifest
    sizes = {s: sum(f.size for f in m.files if f.format == "parquet" and f.split == s)
             for s in HF_SPLITS}
    sampled = sum((languages or {}).values())
    drops = drops_by_reason(m.stats)
    body = [
        f"# {m.dataset} @ {m.version}", "",
        ("Supervised fine-tuning pairs written by annotators in Label Studio, filtered, "
         "deduplicated and split by dedup cluster (no near-duplicate straddles train and "
         "validation). Built by sftflow."), "",
        "```python", "import datasets", "", "ds = datasets.load_dataset(\"<this folder or repo>\")",
        "```", "",
        "| split | rows | parquet bytes |", "| --- | ---: | ---: |",
        *[f"| {hf_split(s)} | {m.rows.get(s, 0)} | {sizes[s]} |" for s in HF_SPLITS], "",
        "## Lineage", "",
        f"- dataset version: `{m.version}`",
        f"- parent version: `{m.parent}`" if m.parent else "- parent version: none (first version)",
        f"- build config hash: `{m.config_hash}`",
        f"- built at: {m.created_at}",
        *([f"- code version: `{m.code_version}`"] if m.code_version else []),
        *[f"- source {k}: {v}" for k, v in written_source(m.source).items()], "",
        "## Languages", "",
        (", ".join(f"{lang} ({n} of {sampled} sampled rows)" for lang, n in languages.items())
         if languages else "not detected"), "",
        "## Rows dropped, by reason", "",
        *(["| stage | reason | rows |", "| --- | --- | ---: |",
           *[f"| {stage} | {reason} | {n} |" for stage, reason, n in drops]]
          if drops else ["none recorded"]), "",
        "## Build configuration", "",
        "```json", json.dumps(m.config, indent=2, sort_keys=True, ensure_ascii=False), "```", "",
        "## Files", "",
        ("`data/<split>/` Parquet (all columns, lineage included) is the `default` config. "
         "`openai/<split>/` chat JSONL (`{\"messages\": [...]}`) and `trl/<split>/` "
         "prompt/completion JSONL hold the same rows: load those with "
         "`datasets.load_dataset(\"json\", data_files=...)`. `manifest.json` lists every file "
         "with its sha256; `exclusions.jsonl` every dropped row with its reason."), "",
    ]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _row_texts(folder: Path) -> Iterable[str]:
    import pyarrow.parquet as pq

    for path in sorted(folder.glob("data/*/*.parquet")):
        table = pq.read_table(path, columns=["prompt", "completion"])
        for prompt, completion in zip(table.column("prompt").to_pylist(),
                                      table.column("completion").to_pylist(), strict=True):
            yield f"{prompt}\n{completion}"


def write_card(folder: str | Path, manifest: _Version, *,
               license: str = DEFAULT_LICENSE) -> dict[str, Any]:
    """Write ``folder/README.md`` for a version pulled into ``folder`` (languages detected
    over its Parquet rows). Returns the card's figures."""
    folder = Path(folder)
    languages = detect_languages(_row_texts(folder))
    card = build_card(manifest, license=license, languages=languages)
    tmp = folder / (CARD + ".part")
    tmp.write_text(str(card), encoding="utf-8")
    tmp.replace(folder / CARD)
    return {"languages": sorted(languages), "license": card.data.license,
            "size_category": card.data.size_categories[0]}
