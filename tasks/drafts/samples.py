"""Sample outputs after training: a few eval prompts answered by the new model beside the
previous one (the dataset's ``best`` model the eval gate compared with), for people to read.

The prompts are the first rows of the version's eval chat files (system prompt included, as
trained); both models answer through :class:`~.generators.TransformersGenerator`, greedy and
short, so a tiny model on CPU takes a second. A model that cannot load, or a prompt that fails,
shows its error in its cell: the samples never fail a training run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sftflow.tasks.adapters.s3 import S3, parse_s3_uri
from sftflow.tasks.drafts.generators import DraftError, DraftGenerator, TransformersGenerator
from sftflow.tasks.finetune.backends import Baseline, JobSpec
from sftflow.tasks.runtime.declare import compute_task

CELL_CHARS = 300


class EvalPrompt(BaseModel):
    prompt: str
    system_prompt: str | None = None
    reference: str | None = None


def eval_prompts(rows: Sequence[Mapping[str, Any]], n: int = 3) -> list[EvalPrompt]:
    """The first ``n`` chat rows (``{"messages": [system?, user, assistant]}``) as prompts: the
    last user turn, the system turn, the annotated answer as reference."""
    out = []
    for row in rows:
        messages = row.get("messages") or []
        user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), None)
        if user is None:
            continue
        system = next((m["content"] for m in messages if m.get("role") == "system"), None)
        answer = next((m["content"] for m in reversed(messages) if m.get("role") == "assistant"), None)
        out.append(EvalPrompt(prompt=user, system_prompt=system, reference=answer))
        if len(out) == n:
            break
    return out


def read_chat_rows(s3: S3, uris: Sequence[str], n: int) -> list[dict[str, Any]]:
    """The first ``n`` JSON lines of the chat files at ``uris`` (s3://)."""
    rows: list[dict[str, Any]] = []
    for uri in uris:
        bucket, key = parse_s3_uri(uri)
        data, _ = s3.get_bytes(key, bucket=bucket)
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
                if len(rows) == n:
                    return rows
    return rows


def _cell(value: str | Exception | None) -> str:
    if isinstance(value, DraftError) and value.reason == "empty_draft":
        return "(empty answer)"  # an answer too: an untrained model often stops at once
    if isinstance(value, Exception):
        return f"(error: {type(value).__name__}: {value})"[:CELL_CHARS]
    text = (value or "").replace("\n", " ")
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS - 1] + "…"


def compare_outputs(prompts: Sequence[EvalPrompt],
                    models: Mapping[str, Callable[[str | None], DraftGenerator] | Exception]) -> list[dict[str, str]]:
    """One table row per prompt: ``prompt``, ``reference`` and one column per model with its
    answer. ``models`` maps a column name to a factory taking the system prompt, or to the
    exception that kept the model from loading (shown in every cell of its column)."""
    columns: dict[str, list[str | Exception]] = {}
    for name, factory in models.items():
        if isinstance(factory, Exception):
            columns[name] = [factory] * len(prompts)
            continue
        answers: list[str | Exception] = []
        generators: dict[str | None, DraftGenerator | Exception] = {}
        for p in prompts:
            if p.system_prompt not in generators:
                try:
                    generators[p.system_prompt] = factory(p.system_prompt)
                except Exception as err:  # noqa: BLE001 - shown in the cell
                    generators[p.system_prompt] = err
            gen = generators[p.system_prompt]
            answers.append(gen if isinstance(gen, Exception) else gen.generate([p.prompt])[0])
        columns[name] = answers
    return [{"prompt": _cell(p.prompt), "reference": _cell(p.reference),
             **{name: _cell(col[i]) for name, col in columns.items()}}
            for i, p in enumerate(prompts)]


def _factory(model_dir: str | Path, base_dir: str | Path | None, version: str,
             max_new_tokens: int) -> Callable[[str | None], DraftGenerator]:
    def build(system_prompt: str | None) -> DraftGenerator:
        return TransformersGenerator(model_dir, model_version=version, base_dir=base_dir,
                                     system_prompt=system_prompt, max_new_tokens=max_new_tokens)
    return build


def sample_outputs(s3: S3, spec: JobSpec, model_dir: Path, workdir: Path, *, n: int = 3,
                   max_new_tokens: int = 32) -> list[dict[str, str]]:
    """The new model (``model_dir``: the saved model, or the LoRA adapter on ``spec.base_model``)
    and ``spec.baseline`` (if any) on the first ``n`` eval prompts; ``[]`` without eval files."""
    from sftflow.tasks.finetune.training import materialise_model

    if not spec.chat_eval_files:
        return []
    try:
        prompts = eval_prompts(read_chat_rows(s3, spec.chat_eval_files, n), n)
    except Exception as err:  # noqa: BLE001 - samples are for reading, never fatal
        return [{"prompt": _cell(err)}]
    cache = workdir / "models"

    def resolve(location: str, method: str, base_model: str) -> tuple[str, str | None]:
        saved = materialise_model(s3, location, cache)
        return saved, materialise_model(s3, base_model, cache) if method == "lora" else None

    models: dict[str, Any] = {}
    new_base = materialise_model(s3, spec.base_model, cache) if spec.method == "lora" else None
    models[f"new ({spec.job})"] = _factory(model_dir, new_base, spec.job, max_new_tokens)
    baseline: Baseline | None = spec.baseline
    if baseline is not None:
        name = f"previous ({baseline.job})"
        try:
            models[name] = _factory(*resolve(baseline.model_uri, baseline.method, baseline.base_model),
                                    baseline.job, max_new_tokens)
        except Exception as err:  # noqa: BLE001 - shown in its column
            models[name] = err
    return compare_outputs(prompts, models)


sample_outputs_task = compute_task(name="sample-outputs")(sample_outputs)
