"""Supervised fine-tuning with TRL ``SFTTrainer`` in chat format, optional LoRA (PEFT).

This is what the ``train_trl`` flow runs on the training machine. The rows are the dataset
version's OpenAI chat files (``{"messages": [system?, user, assistant]}``, the very lines the
``openai`` backend uploads, system prompt included), read with ``datasets`` over s3:// through
fsspec, so both backends train on the same inputs.

Format (:func:`chat_format`): with a chat template, each row is a conversational
prompt/completion pair (prompt = the turns before the assistant's, completion = the assistant
turn) rendered by the base model's own template; TRL labels the prompt tokens -100, so the loss
covers the assistant turn only (its end-of-turn token included). A tokenizer without a chat
template falls back to plain prompt/completion text (the user turn, no system prompt), said in
the result's ``notes`` and ``metrics["format"]``.

Length (:func:`check_lengths`): every row is measured with the base model's tokenizer, the way
TRL tokenizes it, before training. Rows over ``max_length`` are dropped and counted, or fail the
run (``length_policy``); TRL gets no ``max_length`` of its own (packing: the packed sequences'
length, which every row already fits), so nothing is truncated.

Options (``tasks/finetune/trl_config.py``): ``packing`` (TRL's best-fit decreasing, padding-free),
``gradient_checkpointing`` and ``precision``. The metrics say what the trainer used: ``packing``,
``training_sequences`` (rows, or packed sequences), and ``gradient_checkpointing`` and
``precision`` as seen during the first training step.

Token stream (:func:`token_stream`, ``tasks/finetune/tokens.py``): before the trainer is built,
the train rows are tokenized the way TRL will, and the run is refused (SftflowError naming the
rows) when a row would train on zero tokens or the template lacks what ``loss`` needs
(``assistant``: ``{% generation %}`` markers). The rows TRL prepared must equal them, and the
first batches the trainer draws are checked against the predicted ones; the record (tokenizer
and template hashes, mask coverage, versions, seed, batch hashes) is the result's
``training_record``.

Few-shot baseline (:func:`few_shot_baseline`, ``tasks/finetune/few_shot.py``): with
``spec.few_shot``, the base model as loaded, before the first step, is scored on the same eval
rows with ``k`` train rows (chosen by a recorded seed) prepended to each prompt in the format
it trains on, only the completion tokens counted: ``metrics["few_shot_eval_loss"]`` and the
result's ``few_shot``. It is read from (and written to) a cache shared by every job of the same
base model, version, k and seed; prompts longer than the model's context skip it, with the reason.

The trained model (full) or adapter (LoRA) and its tokenizer are saved to a folder the caller
uploads. Nothing here talks to a model hub: models load with ``local_files_only=True`` (a hub id
must be in the local cache). The process-wide ``HF_HUB_OFFLINE`` is left alone: it would also
make ``datasets`` refuse s3:// URLs for every other caller in the process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from sftflow.core.errors import SftflowError
from sftflow.core.failpoints import failpoint
from sftflow.core.hashing import sha256_hex
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.finetune import few_shot, tokens, trl_config
from sftflow.tasks.finetune.backends import Baseline, Hyperparameters, JobSpec
from sftflow.tasks.finetune.files import download_prefix, prefix_has
from sftflow.tasks.runtime.declare import compute_task, io_task

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

Format = Literal["chat", "prompt_completion"]


def base_model_kind(s3: S3, base_model: str) -> str:
    """``"s3"``, ``"local"`` or ``"hub"``; raises SftflowError when the model is not there.

    An s3:// prefix or local folder must hold ``config.json`` (a model) or
    ``adapter_config.json``. A hub id must be in the local hub cache, because training runs
    offline (``local_files_only``); on a machine with hub access, pre-fetch it into the cache.
    """
    if base_model.startswith("s3://"):
        if not prefix_has(s3, base_model, "config.json"):
            raise SftflowError(f"base model not found: no config.json under {base_model}")
        return "s3"
    path = Path(base_model).expanduser()
    if path.is_absolute() or base_model.startswith(".") or path.exists():
        if not (path / "config.json").is_file():
            raise SftflowError(f"base model not found: no config.json in folder {path}")
        return "local"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(base_model, "config.json")
    except HFValidationError as err:
        raise SftflowError(f"base model {base_model!r} is neither a folder, s3:// nor a hub id") from err
    if not isinstance(cached, str):
        raise SftflowError(
            f"base model {base_model!r} is not in the local hub cache and training runs offline "
            "(pre-fetch it with `hf download`, or pass a folder or s3:// prefix)"
        )
    return "hub"


def materialise_model(s3: S3, model: str, cache_dir: Path) -> str:
    """A local path or hub id ``from_pretrained`` can load; s3:// prefixes are downloaded."""
    if not model.startswith("s3://"):
        return str(Path(model).expanduser()) if Path(model).expanduser().exists() else model
    dest = cache_dir / sha256_hex(model)[:16]
    if not (dest / ".complete").exists():
        download_prefix(s3, model, dest)
        (dest / ".complete").touch()
    return str(dest)


def load_chat_splits(train_files: list[str], eval_files: list[str], storage_options: dict,
                     cache_dir: Path) -> dict[str, list[list[dict[str, str]]]]:
    """``{"train": [messages, ...], "eval": [...]}`` from the openai_chat JSONL files (``eval``
    only when there are eval files).

    A user's ``HF_HUB_OFFLINE=1`` also makes ``datasets`` refuse every remote URL, s3://
    included; the json builder never needs the hub, so offline mode is lifted for this call.
    """
    import datasets
    from datasets import load_dataset

    if not train_files:
        raise SftflowError("the job has no openai_chat train files: the trl backend trains on them")
    files = {"train": train_files}
    if eval_files:
        files["eval"] = eval_files
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = False
    try:
        ds = load_dataset("json", data_files=files, storage_options=storage_options,
                          cache_dir=str(cache_dir))
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    if "messages" not in ds["train"].column_names:
        raise SftflowError(f"training data lacks the messages column: {train_files[0]}")
    return {split: ds[split]["messages"] for split in ds}


def chat_format(tokenizer) -> Format:
    """``"chat"`` when the tokenizer has a chat template, else ``"prompt_completion"``."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "prompt_completion"


def split_turns(messages: list[dict[str, Any]]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """``(prompt turns, assistant turn)`` of one chat row: the last turn is the assistant's and
    a user turn comes before it; SftflowError for any other shape."""
    roles = [m.get("role") for m in messages]
    if len(messages) < 2 or roles[-1] != "assistant" or "user" not in roles[:-1]:
        raise SftflowError(f"a chat row must end with an assistant turn after a user turn, not {roles}")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    return turns[:-1], turns[-1]


def to_example(messages: list[dict[str, Any]], fmt: Format) -> dict[str, Any]:
    """One TRL prompt/completion example: conversational (lists of turns) for ``"chat"``, the
    last user turn and the assistant's text for ``"prompt_completion"``."""
    prompt, answer = split_turns(messages)
    if fmt == "chat":
        return {"prompt": prompt, "completion": [answer]}
    user = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    return {"prompt": user, "completion": answer["content"]}


def token_length(tokenizer, example: dict[str, Any]) -> int:
    """Tokens of ``example`` as trl 1.16's ``SFTTrainer`` tokenizes it: the chat template over
    prompt + completion turns, or the text prompt + completion + EOS."""
    if isinstance(example["prompt"], list):
        return len(tokenizer.apply_chat_template(example["prompt"] + example["completion"],
                                                 tokenize=True, return_dict=True)["input_ids"])
    text = example["prompt"] + example["completion"]
    eos = tokenizer.eos_token
    if eos and not example["completion"].endswith(eos):
        text += eos
    return len(tokenizer(text=text)["input_ids"])


class LengthCheck(BaseModel):
    """What :func:`check_lengths` saw and which rows it keeps (indices per split)."""

    max_length: int
    length_policy: str
    rows_total: int
    rows_over_max_length: int
    max_tokens_seen: int
    keep: dict[str, list[int]]

    def metrics(self) -> dict[str, Any]:
        return self.model_dump(exclude={"keep"})


def check_lengths(lengths: dict[str, list[int]], max_length: int, policy: str) -> LengthCheck:
    """Rows over ``max_length`` tokens are left out of ``keep`` (``drop``) or raise an
    SftflowError naming how many (``fail``)."""
    over = {split: [i for i, n in enumerate(ns) if n > max_length] for split, ns in lengths.items()}
    n_over = sum(len(v) for v in over.values())
    seen = max((n for ns in lengths.values() for n in ns), default=0)
    if n_over and policy == "fail":
        where = ", ".join(f"{len(v)} {split}" for split, v in over.items() if v)
        raise SftflowError(f"{n_over} rows ({where}) are longer than max_length {max_length} tokens "
                           f"(longest {seen}); length_policy=fail")
    return LengthCheck(
        max_length=max_length, length_policy=policy, rows_total=sum(len(v) for v in lengths.values()),
        rows_over_max_length=n_over, max_tokens_seen=seen,
        keep={split: [i for i, n in enumerate(ns) if n <= max_length] for split, ns in lengths.items()},
    )


def prepare_examples(messages: dict[str, list], tokenizer, hp: Hyperparameters):
    """``(format, {split: Dataset}, LengthCheck)``: the rows in the tokenizer's format, measured,
    the ones over ``max_length`` dropped (or an SftflowError under ``length_policy=fail``)."""
    from datasets import Dataset

    fmt = chat_format(tokenizer)
    examples = {split: [to_example(m, fmt) for m in rows] for split, rows in messages.items()}
    check = check_lengths({split: [token_length(tokenizer, e) for e in rows]
                           for split, rows in examples.items()}, hp.max_length, hp.length_policy)
    kept = {split: Dataset.from_list([rows[i] for i in check.keep[split]])
            for split, rows in examples.items()}
    if not len(kept["train"]):
        raise SftflowError(f"no train row fits in max_length {hp.max_length} tokens "
                           f"(longest {check.max_tokens_seen})")
    if "eval" in kept and not len(kept["eval"]):
        del kept["eval"]
    return fmt, kept, check


def build_trainer(model, tokenizer, hp: Hyperparameters, train_ds, eval_ds, output_dir: Path,
                  peft_config=None, eval_during_training: bool = False):
    """An ``SFTTrainer`` over prepared examples (:func:`prepare_examples`), printing nothing;
    its options (packing, gradient checkpointing, precision) are ``trl_config.sft_config``'s."""
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=trl_config.sft_config(hp, output_dir, eval_during_training),
                         train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                         peft_config=peft_config)
    _quiet(trainer)
    return trainer


def loss_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged step: ``step``, ``epoch``, train ``loss``, ``eval_loss`` (where the
    eval split was scored), ``learning_rate``, ``grad_norm``; in step order."""
    keys = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")
    rows: dict[int, dict[str, Any]] = {}
    for row in log_history:
        if "loss" in row or "eval_loss" in row:
            rows.setdefault(int(row["step"]), {}).update({k: row[k] for k in keys if k in row})
    return [rows[step] for step in sorted(rows)]


def _step_failpoint(trainer) -> None:
    """``failpoint("finetune.train-step")`` after every training step: fault tests stall or
    kill a training at an exact step (``finetune.train-step=sleep(600)@2``)."""
    from transformers import TrainerCallback

    class StepFailpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            failpoint("finetune.train-step")

    trainer.add_callback(StepFailpoint())


def _quiet(trainer) -> None:
    """Losses go to the result and the Prefect artifact, not to stdout line by line."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def load_tokenizer(model_dir: str):
    """The tokenizer a training uses (its pad token the EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)


def _load(model_dir: str, method: str, adapter_dir: str | None = None):
    tokenizer = load_tokenizer(adapter_dir or model_dir)
    model = _load_model(model_dir)
    if adapter_dir and method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir, local_files_only=True)
    return model, tokenizer


def evaluate_baseline(s3: S3, baseline: Baseline, eval_messages: list, spec: JobSpec,
                      workdir: Path) -> float:
    """Eval loss of an earlier model on this version's eval rows (those the new model trained
    with: same length check), in the earlier tokenizer's format; same metric as training."""
    from datasets import Dataset

    cache = workdir / "models"
    saved = materialise_model(s3, baseline.model_uri, cache)
    if baseline.method == "lora":
        model, tok = _load(materialise_model(s3, baseline.base_model, cache), "lora", saved)
    else:
        model, tok = _load(saved, "full")
    fmt = chat_format(tok)
    eval_ds = Dataset.from_list([to_example(m, fmt) for m in eval_messages])
    # SFTTrainer insists on a train set; nothing is trained, the eval rows stand in.
    trainer = build_trainer(model, tok, trl_config.eval_only(spec.hyperparameters), eval_ds, eval_ds,
                            workdir / "baseline-eval")
    return float(trainer.evaluate()["eval_loss"])


def _context_length(model, tokenizer) -> int | None:
    """The longest sequence the model takes: its config's ``max_position_embeddings``, else the
    tokenizer's ``model_max_length`` when it is a real figure."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not n and (getattr(tokenizer, "model_max_length", None) or 0) < 10**9:
        n = tokenizer.model_max_length
    return n or None


def few_shot_baseline(s3: S3 | None, spec: JobSpec, model, tokenizer, fmt: Format, messages: dict[str, list],
                      check: LengthCheck, workdir: Path) -> few_shot.FewShotResult | None:
    """The base model (``model``, untrained) with ``spec.few_shot.k`` train rows in its prompt,
    scored on the eval rows the fine-tune is scored on, with its metric (``build_trainer``:
    loss on the completion tokens only). Read from the cache when another job of the same base
    model, version, k and seed computed it (then ``model`` is not used); None when not asked."""
    ask = spec.few_shot
    if ask is None:
        return None
    key = few_shot.cache_key(spec, ask)
    if s3 is not None and ask.cache_uri and (hit := few_shot.read_cached(s3, ask.cache_uri, key)):
        return hit
    chosen = few_shot.choose_examples(messages["train"], check.keep["train"], ask.k, ask.seed)
    result = few_shot.FewShotResult(
        base_model=spec.base_model, dataset=spec.dataset, version=spec.version, k=ask.k, seed=ask.seed,
        examples=chosen, examples_sha256=[few_shot.row_sha256(messages["train"][i]) for i in chosen],
        eval_rows=len(check.keep.get("eval", [])), cache_key=key)
    if not result.eval_rows:
        return result.model_copy(update={"skipped": "no eval rows"})
    shots = [to_example(messages["train"][i], fmt) for i in chosen]
    rows = [few_shot.with_shots(shots, to_example(messages["eval"][i], fmt), tokenizer.eos_token)
            for i in check.keep["eval"]]
    longest, limit = max(token_length(tokenizer, r) for r in rows), _context_length(model, tokenizer)
    if limit and longest > limit:
        return result.model_copy(update={"skipped": f"the {len(chosen)}-shot prompts reach {longest} "
                                         f"tokens, over the model's context of {limit}"})
    from datasets import Dataset

    ds = Dataset.from_list(rows)
    # SFTTrainer insists on a train set; nothing is trained, the eval rows stand in.
    trainer = build_trainer(model, tokenizer, trl_config.eval_only(spec.hyperparameters), ds, ds,
                            workdir / "few-shot-eval")
    result.eval_loss = float(trainer.evaluate()["eval_loss"])
    if s3 is not None and ask.cache_uri:
        few_shot.write_cached(s3, ask.cache_uri, result)
    return result


def token_stream(tokenizer, fmt: Format, messages: dict[str, list], examples: dict[str, Any],
                 check: LengthCheck, spec: JobSpec, *, refuse: bool = True):
    """``(stream, TokenRecord)``: the train split's ``(input_ids, labels)`` as TRL will build them
    (``tasks/finetune/tokens.py``; with ``packing``, packed into ``(input_ids, labels,
    seq_lengths)`` sequences as TRL packs them) and the record of what decided them. With
    ``refuse``, an SftflowError when the template lacks what the loss needs or a row would
    train on zero tokens."""
    hp = spec.hyperparameters
    if refuse:
        tokens.check_template(tokenizer, fmt, hp.loss)
    rows = tokens.tokenize_rows(tokenizer, examples["train"], hp.loss)
    cov = tokens.coverage(rows, hp.max_length, row_numbers=check.keep["train"],
                          dropped=len(messages["train"]) - len(check.keep["train"]))
    if refuse:
        tokens.refuse_untrained(cov)
    packed = tokens.pack_rows(rows, hp.max_length) if hp.packing else None
    record = tokens.token_record(tokenizer, rows, name=spec.base_model, fmt=fmt, loss=hp.loss, seed=hp.seed,
                                 batch_size=hp.batch_size, cov=cov, packed=packed)
    return (rows if packed is None else packed), record


#: The columns of a prepared train row that make the stream (``seq_lengths``: packed rows only).
_STREAM = ("input_ids", "labels", "seq_lengths")


def _check_prepared(trainer, stream: list) -> None:
    """The rows TRL prepared (packed, with ``packing``) are the analysed ones, or an
    SftflowError before any step: the record would otherwise describe a stream the model
    never saw."""
    keys = _STREAM[:len(stream[0])]
    n = len(trainer.train_dataset)
    for i, row in enumerate(trainer.train_dataset):
        if i >= len(stream) or tuple(list(row[k]) for k in keys) != tuple(stream[i]):
            break
    else:
        if n == len(stream):
            return
        i = min(n, len(stream))
    raise SftflowError(f"TRL prepared train row {i} differently from sftflow's analysis of the "
                       "token stream (a trl version it does not mirror?): not starting the training")


def _observe_batches(trainer) -> list[str]:
    """The hashes of the first ``tokens.BATCHES_HASHED`` training batches as the trainer draws
    them (its train loader's collator, wrapped; eval batches are not seen)."""
    seen: list[str] = []
    collate, make_loader = trainer.data_collator, trainer.get_train_dataloader

    def observed(examples):
        if len(seen) < tokens.BATCHES_HASHED:
            seen.append(tokens.batch_sha256([tuple(e[k] for k in _STREAM if k in e) for e in examples]))
        return collate(examples)

    def train_loader():
        trainer.data_collator = observed
        try:
            return make_loader()
        finally:
            trainer.data_collator = collate

    trainer.get_train_dataloader = train_loader
    return seen


def train_sft(s3: S3, spec: JobSpec, workdir: Path) -> dict[str, Any]:
    """Train, evaluate, save. Returns ``{"metrics", "history", "notes", "model_dir",
    "training_record", "few_shot"}`` (the token stream's ``tokens.TokenRecord``, the few-shot
    baseline's ``few_shot.FewShotResult`` or None)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()

    messages = load_chat_splits(spec.chat_train_files, spec.chat_eval_files, s3.fsspec_options(),
                                workdir / "hf-datasets")
    return train_messages(s3, spec, messages, workdir)


def train_messages(s3: S3 | None, spec: JobSpec, messages: dict[str, list], workdir: Path) -> dict[str, Any]:
    """:func:`train_sft` on chat rows already read (``{"train": [messages, ...], "eval": ...}``);
    ``s3`` is only needed for an s3:// base model or a baseline."""
    hp = spec.hyperparameters
    trl_config.resolve_precision(hp.precision)  # bf16 where the device lacks it: refused first
    model_dir = materialise_model(s3, spec.base_model, workdir / "models")
    tokenizer = load_tokenizer(model_dir)
    fmt, examples, lengths = prepare_examples(messages, tokenizer, hp)
    # refused here, before the model is even loaded
    stream, record = token_stream(tokenizer, fmt, messages, examples, lengths, spec)
    model = _load_model(model_dir)
    # the base model as loaded, before any step changes it (LoRA wraps it in place)
    shots = few_shot_baseline(s3, spec, model, tokenizer, fmt, messages, lengths, workdir)
    train_ds, eval_ds = examples["train"], examples.get("eval")
    notes = [] if shots is None or shots.skipped is None else [f"few-shot baseline skipped: {shots.skipped}"]
    if fmt == "prompt_completion":
        notes.append(f"{spec.base_model} has no chat template: trained on plain prompt/completion "
                     "text (the user turn, without the system prompt)")
    if lengths.rows_over_max_length:
        notes.append(f"dropped {lengths.rows_over_max_length} of {lengths.rows_total} rows longer "
                     f"than max_length {hp.max_length} tokens (longest {lengths.max_tokens_seen})")
    peft_config = trl_config.lora_config(hp) if spec.method == "lora" else None
    trainer = build_trainer(model, tokenizer, hp, train_ds, eval_ds, workdir / "trainer",
                            peft_config, eval_during_training=eval_ds is not None)
    _check_prepared(trainer, stream)
    observed, options = _observe_batches(trainer), trl_config.observe_options(trainer)
    _step_failpoint(trainer)
    out = trainer.train()
    record.batches_observed = observed == record.batches[:len(observed)] and bool(observed)
    if not record.batches_observed:
        notes.append("the trainer drew other batches than the recorded ones: the token stream "
                     "fingerprint does not describe this training")
    metrics: dict[str, Any] = {
        "train_loss": float(out.training_loss),
        "steps": int(out.global_step),
        "train_rows": len(train_ds),
        "eval_rows": len(eval_ds) if eval_ds is not None else 0,
        "train_runtime_s": round(float(out.metrics.get("train_runtime", 0.0)), 3),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "format": fmt,
        **lengths.metrics(),
        # what the trainer used: training sequences after packing; checkpointing and precision as seen
        "packing": hp.packing, "training_sequences": len(trainer.train_dataset), **options,
    }
    if eval_ds is not None:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    history = loss_history(trainer.state.log_history)
    if spec.baseline is not None and eval_ds is not None:
        metrics["baseline_job"] = spec.baseline.job
        metrics["baseline_eval_loss"] = evaluate_baseline(
            s3, spec.baseline, [messages["eval"][i] for i in lengths.keep["eval"]], spec, workdir)

    if shots is not None and shots.eval_loss is not None:
        metrics["few_shot_eval_loss"] = shots.eval_loss

    save_dir = workdir / "model"
    trainer.save_model(str(save_dir))  # the adapter only, for a PEFT model
    tokenizer.save_pretrained(str(save_dir))
    return {"metrics": metrics, "history": history, "notes": notes, "model_dir": save_dir,
            "training_record": record.model_dump(mode="json"),
            "few_shot": shots.model_dump(mode="json") if shots else None}


base_model_kind_task = io_task(name="check-base-model", retries=1)(base_model_kind)
train_sft_task = compute_task(name="train-sft")(train_sft)
