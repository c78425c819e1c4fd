"""The token stream of a TRL job: what decides it, what it trains on, and its fingerprint.

Pure functions over a tokenizer and the prepared examples (``training.prepare_examples``): no
services, no model, no Prefect. They mirror how trl 1.16's ``SFTTrainer`` tokenizes a
prompt/completion dataset and builds its labels (``trl/trainer/sft_trainer.py``, ``tokenize_fn``
and ``build_labels``), and how the trainer orders rows into batches (accelerate's
``SeedableRandomSampler``: ``torch.randperm`` seeded with ``data_seed + epoch``), so the stream
can be computed before any training step and recomputed later without a model:

- :func:`check_template`: the chat template has what the chosen loss needs (``assistant``:
  ``{% generation %}`` markers, which TRL's assistant-only loss masks by) or an SftflowError says why;
- :func:`tokenize_rows`: ``(input_ids, labels)`` per row, labels ``-100`` outside the loss;
- :func:`coverage`: trained tokens per row (min, median), rows with none, truncation;
  :func:`refuse_untrained` refuses a stream where a row trains on zero tokens;
- :func:`pack_rows`: with ``packing``, the rows packed into training sequences by TRL's own
  best-fit decreasing packer (``trl.data_utils.pack_dataset``, as ``SFTTrainer`` calls it);
- :func:`batch_hashes`: sha256 of each of the first :data:`BATCHES_HASHED` batches, in order
  (of the packed sequences, when packing: what the trainer draws);
- :class:`TokenRecord`: all of it, with the tokenizer's and template's hashes, the library
  versions and the seed: the lineage record's ``training_record`` (``lineage.py``).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from importlib import metadata
from typing import Any, Literal

from pydantic import BaseModel, Field

from sftflow.core.errors import SftflowError
from sftflow.core.hashing import canonical_json, sha256_hex

Loss = Literal["completion", "assistant"]
Row = tuple[list[int], list[int]]  # (input_ids, labels)
Packed = tuple[list[int], list[int], list[int]]  # (input_ids, labels, seq_lengths): rows packed

#: How many of the first training batches are hashed into the record.
BATCHES_HASHED = 4
#: The libraries whose versions decide the stream (or the training), when installed.
LIBRARIES = ("trl", "transformers", "tokenizers", "torch", "accelerate", "datasets", "peft")
IGNORE = -100
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _json_sha256(obj: Any) -> str:
    return sha256_hex(canonical_json(obj))


# -- what decides the stream ------------------------------------------------------------------
def template_sha256(tokenizer) -> str | None:
    """sha256 of the chat template's text (None: the tokenizer has none)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return _json_sha256(template)
    return sha256_hex(template) if template else None


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's serialized state: for a fast tokenizer its ``tokenizer.json``
    (vocab, merges, normalizer, pre-tokenizer, post-processor, added tokens) and, for any, the
    vocabulary, the special tokens and the class; the chat template is hashed on its own."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = {
        "class": type(tokenizer).__name__,
        "tokenizer_json": backend.to_str() if backend is not None else None,
        "vocab": None if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return _json_sha256(state)


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES` (a missing one, e.g. peft, is left out)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def has_generation_markers(template: str | dict | None) -> bool:
    if isinstance(template, dict):
        template = template.get("default")
    return bool(template) and _GENERATION.search(template) is not None


def check_template(tokenizer, fmt: str, loss: Loss) -> None:
    """SftflowError when the template lacks what ``loss`` needs: the assistant-only loss
    trains on the tokens between ``{% generation %}`` and ``{% endgeneration %}``; a template
    without them (most stock ones) would mask every token of every row."""
    if loss != "assistant":
        return
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if fmt != "chat":
        raise SftflowError(f"loss=assistant needs a chat template and the tokenizer of {name} has none: "
                           "train with loss=completion (the default)")
    if not has_generation_markers(tokenizer.chat_template):
        raise SftflowError(
            f"the chat template of {name} has no {{% generation %}} markers: the assistant-only loss "
            "(loss=assistant) masks by them, so every row would train on zero tokens. Use "
            "loss=completion (masks by the prompt/completion split, no markers needed) or a template "
            "that wraps the assistant turn in {% generation %}...{% endgeneration %}")


# -- the stream -------------------------------------------------------------------------------
def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_example(tokenizer, example: dict[str, Any], loss: Loss = "completion") -> Row:
    """``(input_ids, labels)`` of one prompt/completion example as TRL builds them: the
    completion starts where the tokenized prompt (with the generation prompt) and the whole
    row diverge; with ``loss="assistant"`` the template's assistant mask applies as well."""
    assistant = loss == "assistant"
    if isinstance(example["prompt"], list):
        prompt_ids = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=True,
                                             return_dict=True, return_assistant_tokens_mask=assistant)
        ids = list(full["input_ids"])
        masks = [list(full["assistant_masks"])] if assistant else []
    else:
        completion, eos = example["completion"], tokenizer.eos_token
        if eos and not completion.endswith(eos):
            completion += eos
        prompt_ids = tokenizer(text=example["prompt"])["input_ids"]
        ids = list(tokenizer(text=example["prompt"] + completion)["input_ids"])
        masks = []
    start = _common_prefix(prompt_ids, ids)
    masks.append([0] * start + [1] * (len(ids) - start))
    labels = [t if all(m[i] for m in masks) else IGNORE for i, t in enumerate(ids)]
    return ids, labels


def tokenize_rows(tokenizer, examples, loss: Loss = "completion") -> list[Row]:
    return [tokenize_example(tokenizer, e, loss) for e in examples]


class Coverage(BaseModel):
    """How much of the stream the loss covers, and what was cut."""

    rows: int
    trained_tokens_min: int
    trained_tokens_median: float
    trained_tokens_total: int
    tokens_total: int
    rows_zero_trained: int
    zero_trained_rows: list[int] = Field(default_factory=list, description="The first 20, as split row numbers.")
    max_length: int
    rows_truncated: int = Field(0, description="Rows cut to max_length by the trainer (none: rows over it are dropped).")
    tokens_truncated: int = 0
    rows_dropped_over_max_length: int = 0


def coverage(rows: Sequence[Row], max_length: int, *, row_numbers: Sequence[int] | None = None,
             dropped: int = 0, truncate_at: int | None = None) -> Coverage:
    """Trained tokens per row (labels not ``-100``) and truncation at ``truncate_at`` (the
    trainer's ``max_length``; None: it cuts nothing). ``row_numbers``: each row's number in
    its split before rows were dropped, to name rows with zero trained tokens."""
    numbers = list(row_numbers) if row_numbers is not None else list(range(len(rows)))
    trained = [sum(1 for x in labels if x != IGNORE) for _, labels in rows]
    zero = [numbers[i] for i, n in enumerate(trained) if n == 0]
    over = [len(ids) - truncate_at for ids, _ in rows if truncate_at is not None and len(ids) > truncate_at]
    return Coverage(
        rows=len(rows), trained_tokens_min=min(trained, default=0),
        trained_tokens_median=float(statistics.median(trained)) if trained else 0.0,
        trained_tokens_total=sum(trained), tokens_total=sum(len(ids) for ids, _ in rows),
        rows_zero_trained=len(zero), zero_trained_rows=zero[:20], max_length=max_length,
        rows_truncated=len(over), tokens_truncated=sum(over), rows_dropped_over_max_length=dropped,
    )


def refuse_untrained(cov: Coverage, split: str = "train", *, why: str = "") -> None:
    """SftflowError naming the rows that would train on zero tokens (the loss mask is all
    ``-100``): their loss is nothing, silently, and a stream of them trains nothing."""
    if not cov.rows_zero_trained:
        return
    more = "" if cov.rows_zero_trained <= len(cov.zero_trained_rows) else ", ..."
    raise SftflowError(
        f"{cov.rows_zero_trained} of {cov.rows} {split} rows would train on zero tokens (the loss mask "
        f"covers none of their tokens): {split} rows {', '.join(map(str, cov.zero_trained_rows))}{more}. "
        f"{why or 'The chat template renders no completion tokens after the prompt for them'}; "
        "not starting the training")


# -- packing ----------------------------------------------------------------------------------
def pack_rows(rows: Sequence[Row], max_length: int) -> list[Packed]:
    """The rows packed into sequences of at most ``max_length`` tokens as trl's ``SFTTrainer``
    packs them with ``packing_strategy="bfd"``: its ``pack_dataset`` over ``input_ids`` and
    ``labels`` in split order, unshuffled; ``seq_lengths`` are the rows' lengths in each.
    Labels are unchanged: every row keeps its own mask."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    ds = Dataset.from_dict({"input_ids": [list(ids) for ids, _ in rows],
                            "labels": [list(labels) for _, labels in rows]})
    packed = pack_dataset(ds, max_length, "bfd", {"num_proc": None})
    return [(list(r["input_ids"]), list(r["labels"]), list(r["seq_lengths"])) for r in packed]


# -- batches ----------------------------------------------------------------------------------
def batch_order(n_rows: int, batch_size: int, seed: int, n_batches: int = BATCHES_HASHED) -> list[list[int]]:
    """Row indices of the first ``n_batches`` training batches as the trainer draws them:
    each epoch a ``torch.randperm`` seeded with ``seed + epoch`` (accelerate's
    ``SeedableRandomSampler`` with ``data_seed=seed``), cut into batches (the last of an
    epoch may be short)."""
    import torch

    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < n_batches and n_rows:
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches += [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]
        epoch += 1
    return batches[:n_batches]


def batch_sha256(rows: Sequence[Row | Packed]) -> str:
    """sha256 of one batch: its rows' ``input_ids`` and ``labels`` (packed: and
    ``seq_lengths``) in order, unpadded."""
    return _json_sha256([[list(part) for part in row] for row in rows])


def batch_hashes(rows: Sequence[Row | Packed], batch_size: int, seed: int,
                 n_batches: int = BATCHES_HASHED) -> list[str]:
    return [batch_sha256([rows[i] for i in batch])
            for batch in batch_order(len(rows), batch_size, seed, n_batches)]


def first_difference(recorded: Sequence[str], recomputed: Sequence[str]) -> int | None:
    """Index of the first batch whose hash differs (a missing batch differs); None: identical."""
    for i in range(max(len(recorded), len(recomputed))):
        if i >= len(recorded) or i >= len(recomputed) or recorded[i] != recomputed[i]:
            return i
    return None


class TokenRecord(BaseModel):
    """What decided a TRL job's token stream, and its fingerprint (the lineage record's
    ``training_record``): enough to re-tokenise and compare (``sftflow models reproduce``)."""

    tokenizer: str = Field(description="The tokenizer as the job named it (its base model).")
    tokenizer_sha256: str
    chat_template_sha256: str | None = None
    format: str = Field(description="chat (the template) or prompt_completion (plain text).")
    loss: Loss
    seed: int
    batch_size: int
    coverage: Coverage
    versions: dict[str, str]
    packing: Literal["bfd"] | None = Field(
        None, description="How rows were packed into training sequences (None: a row per sequence).")
    packed_rows: int | None = Field(None, description="Training sequences after packing.")
    batches: list[str] = Field(description=f"sha256 of each of the first {BATCHES_HASHED} batches, in "
                               "order (packing: of the packed sequences, with their seq_lengths).")
    batches_sha256: str = Field(description="sha256 of the list of batch hashes.")
    rows_sha256: str = Field(description="sha256 of every train row's input_ids and labels, in split "
                             "order (before packing).")
    batches_observed: bool | None = Field(
        None, description="The trainer drew exactly these batches (checked as it trained).")


def token_record(tokenizer, rows: Sequence[Row], *, name: str, fmt: str, loss: Loss, seed: int,
                 batch_size: int, cov: Coverage, packed: Sequence[Packed] | None = None) -> TokenRecord:
    """The record of a stream; ``packed``: the rows as packed (:func:`pack_rows`), whose
    batches the trainer draws."""
    batches = batch_hashes(rows if packed is None else packed, batch_size, seed)
    return TokenRecord(
        tokenizer=name, tokenizer_sha256=tokenizer_sha256(tokenizer),
        chat_template_sha256=template_sha256(tokenizer), format=fmt, loss=loss, seed=seed,
        batch_size=batch_size, coverage=cov, versions=library_versions(),
        packing=None if packed is None else "bfd", packed_rows=None if packed is None else len(packed),
        batches=batches,
        batches_sha256=_json_sha256(batches), rows_sha256=batch_sha256(rows),
    )
