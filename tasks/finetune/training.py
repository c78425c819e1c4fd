"""Supervised fine-tuning with TRL ``SFTTrainer`` on prompt/completion rows, optional LoRA (PEFT).

This is what the ``train_trl`` flow runs on the training machine. Rows come from a dataset
version's parquet files (read with ``datasets`` over s3:// through fsspec); the loss covers the
completion tokens only (TRL's ``completion_only_loss`` on prompt/completion data). The trained
model (full) or adapter (LoRA) and its tokenizer are saved to a folder the caller uploads.
Nothing here talks to a model hub: models load with ``local_files_only=True`` (a hub id must be
in the local cache). The process-wide ``HF_HUB_OFFLINE`` is left alone: it would also make
``datasets`` refuse s3:// URLs for every other caller in the process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sftflow.core.errors import SftflowError
from sftflow.core.hashing import sha256_hex
from sftflow.tasks._prefect import compute_task, io_task
from sftflow.tasks.finetune.backends import Baseline, Hyperparameters, JobSpec
from sftflow.tasks.finetune.files import download_prefix, prefix_has
from sftflow.tasks.storage import S3

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COLUMNS = ("prompt", "completion")


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


def load_splits(train_files: list[str], eval_files: list[str], storage_options: dict, cache_dir: Path):
    """A ``DatasetDict`` with ``train`` and ``eval``, only the prompt and completion columns.

    A user's ``HF_HUB_OFFLINE=1`` also makes ``datasets`` refuse every remote URL, s3://
    included; the parquet builder never needs the hub, so offline mode is lifted for this call.
    """
    import datasets
    from datasets import load_dataset

    files = {"train": train_files}
    if eval_files:
        files["eval"] = eval_files
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = False
    try:
        ds = load_dataset(
            "parquet", data_files=files, storage_options=storage_options, cache_dir=str(cache_dir)
        )
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    missing = [c for c in COLUMNS if c not in ds["train"].column_names]
    if missing:
        raise SftflowError(f"training data lacks columns {missing}: {train_files[0]}")
    return ds.select_columns(list(COLUMNS))


def _sft_config(spec_hp: Hyperparameters, output_dir: Path):
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=spec_hp.epochs,
        max_steps=spec_hp.max_steps,
        learning_rate=spec_hp.learning_rate,
        per_device_train_batch_size=spec_hp.batch_size,
        per_device_eval_batch_size=spec_hp.batch_size,
        max_length=spec_hp.max_length,
        completion_only_loss=True,
        packing=False,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=spec_hp.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataset_num_proc=None,
    )


def _quiet(trainer) -> None:
    """Losses go to the result and the Prefect artifact, not to stdout line by line."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _load(model_dir: str, method: str, adapter_dir: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    if adapter_dir and method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir, local_files_only=True)
    return model, tokenizer


def evaluate_baseline(s3: S3, baseline: Baseline, eval_ds, spec: JobSpec, workdir: Path) -> float:
    """Eval loss of an earlier model on this version's eval split (same metric as training)."""
    from trl import SFTTrainer

    cache = workdir / "models"
    saved = materialise_model(s3, baseline.model_uri, cache)
    if baseline.method == "lora":
        model, tok = _load(materialise_model(s3, baseline.base_model, cache), "lora", saved)
    else:
        model, tok = _load(saved, "full")
    args = _sft_config(spec.hyperparameters, workdir / "baseline-eval")
    # SFTTrainer insists on a train set; nothing is trained, the eval rows stand in.
    trainer = SFTTrainer(model=model, args=args, train_dataset=eval_ds, eval_dataset=eval_ds,
                         processing_class=tok)
    _quiet(trainer)
    return float(trainer.evaluate()["eval_loss"])


def train_sft(s3: S3, spec: JobSpec, workdir: Path) -> dict[str, Any]:
    """Train, evaluate, save. Returns ``{"metrics", "history", "model_dir", "counts"}``."""
    from transformers.utils import logging as hf_logging
    from trl import SFTTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()

    hp = spec.hyperparameters
    splits = load_splits(spec.train_files, spec.eval_files, s3.fsspec_options(), workdir / "hf-datasets")
    train_ds, eval_ds = splits["train"], splits.get("eval")
    model_dir = materialise_model(s3, spec.base_model, workdir / "models")
    model, tokenizer = _load(model_dir, "full")

    peft_config = None
    if spec.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    args = _sft_config(hp, workdir / "trainer")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    _quiet(trainer)
    out = trainer.train()
    metrics: dict[str, Any] = {
        "train_loss": float(out.training_loss),
        "steps": int(out.global_step),
        "train_rows": len(train_ds),
        "eval_rows": len(eval_ds) if eval_ds is not None else 0,
        "train_runtime_s": round(float(out.metrics.get("train_runtime", 0.0)), 3),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    if eval_ds is not None:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    history = [
        {k: v for k, v in row.items() if k in ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")}
        for row in trainer.state.log_history
        if "loss" in row or "eval_loss" in row
    ]
    if spec.baseline is not None and eval_ds is not None:
        metrics["baseline_job"] = spec.baseline.job
        metrics["baseline_eval_loss"] = evaluate_baseline(s3, spec.baseline, eval_ds, spec, workdir)

    save_dir = workdir / "model"
    trainer.save_model(str(save_dir))  # the adapter only, for a PEFT model
    tokenizer.save_pretrained(str(save_dir))
    return {"metrics": metrics, "history": history, "model_dir": save_dir}


check_base_model = io_task(name="check-base-model", retries=1)(base_model_kind)
train_sft_task = compute_task(name="train-sft")(train_sft)
