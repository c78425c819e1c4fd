"""The few-shot baseline of the eval gate: does fine-tuning beat the cheap alternative?

The base model is given ``k`` train rows in its prompt (in-context learning) and scored on the
version's eval split with the fine-tune's own metric, the loss on the completion tokens:

- :func:`choose_examples`: the ``k`` rows are those of the train rows kept by the length check
  with the smallest ``sha256(seed, row)``, so a seed names the same rows whatever their order in
  the files, and a reader can recompute the choice;
- :func:`with_shots`: each eval example with the shots prepended in the format the model trains
  on: chat turns (the row's system prompt first, then each shot's user and assistant turns,
  then the row's prompt) or, without a chat template, the trained texts one after the other
  (prompt + completion + EOS each). The completion is the row's own, so TRL's prompt/completion
  mask scores the same tokens as for the fine-tune, and none of the shots';
- :class:`FewShotResult`: what was evaluated (k, seed, the rows shown, their hashes) and the
  loss, or why it was skipped; the lineage record's ``few_shot``;
- the cache: one result per (base model, dataset version, k, seed, and what decides the eval
  rows and the metric's batching: ``max_length``, ``length_policy``, ``loss``, ``batch_size``)
  at ``<models_prefix>/_few_shot/<key>.json``, so every job of that version and base model reads
  the number the first one computed (:func:`cache_key`, :func:`read_cached`, :func:`write_cached`).

The evaluation itself runs where the training runs (``training.few_shot_baseline``): it needs
the base model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError

from sftflow.core.hashing import canonical_json, config_hash, sha256_hex
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.finetune.backends import FewShotSpec, JobSpec
from sftflow.tasks.finetune.files import read_json, write_json

CACHE_FOLDER = "_few_shot"


class FewShotResult(BaseModel):
    """The base model with ``k`` train rows in its prompt, on the eval split's completions."""

    base_model: str
    dataset: str
    version: str
    k: int
    seed: int
    examples: list[int] = Field(default_factory=list, description="Train row numbers shown, in order.")
    examples_sha256: list[str] = Field(default_factory=list, description="sha256 of each row shown.")
    eval_rows: int = 0
    eval_loss: float | None = Field(None, description="Loss on the eval completions (None: skipped).")
    skipped: str | None = Field(None, description="Why there is no loss.")
    cached: bool = Field(False, description="Read from the cache another job wrote.")
    cache_key: str | None = None


def row_sha256(messages: list[dict[str, Any]]) -> str:
    return sha256_hex(canonical_json(messages))


def choose_examples(train: list[list[dict[str, Any]]], pool: list[int], k: int, seed: int) -> list[int]:
    """The ``k`` rows of ``pool`` (indices into ``train``) with the smallest
    ``sha256(seed, row)``, in that order (all of them when the pool is smaller)."""
    ranked = sorted(pool, key=lambda i: (sha256_hex(f"{seed}\n".encode() + canonical_json(train[i])), i))
    return ranked[:max(k, 0)]


def with_shots(shots: list[dict[str, Any]], example: dict[str, Any], eos: str | None) -> dict[str, Any]:
    """``example`` (a TRL prompt/completion example, ``training.to_example``) with ``shots``
    (examples of the same format) prepended to its prompt; its completion unchanged."""
    if isinstance(example["prompt"], list):
        system = [m for m in example["prompt"] if m["role"] == "system"]
        shown = [m for s in shots for m in [*s["prompt"], *s["completion"]] if m["role"] != "system"]
        rest = [m for m in example["prompt"] if m["role"] != "system"]
        return {"prompt": [*system, *shown, *rest], "completion": example["completion"]}
    texts = []
    for s in shots:
        text = s["prompt"] + s["completion"]
        texts.append(text if not eos or text.endswith(eos) else text + eos)
    return {"prompt": "".join(texts) + example["prompt"], "completion": example["completion"]}


def identity(spec: JobSpec, few_shot: FewShotSpec) -> dict[str, Any]:
    """What decides the few-shot number: base model, version, k, seed, and the knobs that pick
    the eval rows (length check) and batch them (the eval loss is a mean over batches)."""
    hp = spec.hyperparameters
    return {"base_model": spec.base_model, "dataset": spec.dataset, "version": spec.version,
            "k": few_shot.k, "seed": few_shot.seed, "max_length": hp.max_length,
            "length_policy": hp.length_policy, "loss": hp.loss, "batch_size": hp.batch_size}


def cache_key(spec: JobSpec, few_shot: FewShotSpec) -> str:
    return config_hash(identity(spec, few_shot), length=32)


def cache_uri(models_uri: str, key: str) -> str:
    """``<models_uri>/_few_shot/<key>.json`` (``models_uri``: ``s3://bucket/<models_prefix>``;
    the folder's ``_`` keeps it out of the job listing)."""
    return f"{models_uri.rstrip('/')}/{CACHE_FOLDER}/{key}.json"


def read_cached(s3: S3, uri: str, key: str) -> FewShotResult | None:
    """The result cached at ``uri`` for ``key``, marked ``cached``; None when there is none (or
    it is unreadable, or for another key: computed again)."""
    try:
        found = FewShotResult.model_validate(read_json(s3, uri))
    except (KeyError, ValueError, ValidationError):
        return None
    if found.cache_key != key or found.eval_loss is None:
        return None
    return found.model_copy(update={"cached": True})


def write_cached(s3: S3, uri: str, result: FewShotResult) -> None:
    """Cache an evaluated result (a skipped one is not: the next job tries again)."""
    if result.eval_loss is not None:
        write_json(s3, uri, result.model_copy(update={"cached": False}).model_dump(mode="json"))


def plan(spec: JobSpec, k: int, seed: int, models_uri: str) -> FewShotSpec | None:
    """The few-shot baseline a trl job evaluates (None: ``k`` is 0, off), with its cache URI."""
    if k <= 0:
        return None
    ask = FewShotSpec(k=k, seed=seed)
    return ask.model_copy(update={"cache_uri": cache_uri(models_uri, cache_key(spec, ask))})


def recorded(spec: JobSpec, backend: str, k: int, seed: int,
             reported: dict[str, Any] | None) -> dict[str, Any] | None:
    """The lineage record's ``few_shot``: what the job reported for the baseline it was asked
    for (one it did not report is skipped, so the gate promotes nothing), or, for a backend
    that trains elsewhere (``openai``), why there is none; None when none was asked for."""
    if spec.few_shot is None and (backend == "trl" or k <= 0):
        return None
    if spec.few_shot is not None and reported is not None:
        return reported
    why = ("the training job reported no few-shot baseline" if spec.few_shot is not None else
           f"backend {backend} trains at the provider: it reports no loss on the eval completions to "
           "compare and the base model is not here to prompt, so it has no eval gate")
    return FewShotResult(base_model=spec.base_model, dataset=spec.dataset, version=spec.version,
                         k=spec.few_shot.k if spec.few_shot else k,
                         seed=spec.few_shot.seed if spec.few_shot else seed,
                         skipped=why).model_dump(mode="json")
