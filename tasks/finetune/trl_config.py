"""The TRL options of a training: ``SFTConfig`` and ``LoraConfig`` from a job's hyperparameters,
the precision a device trains in, and what the trainer really used, as seen while it trained.

Every option is set here explicitly: trl 1.16's ``SFTConfig`` defaults differ from
``TrainingArguments`` (``gradient_checkpointing=True`` and ``bf16=True``, on CPU too), so
leaving one out would train with what TRL chose, not what the job says.

- **packing** (:class:`~sftflow.tasks.finetune.backends.Hyperparameters` ``packing``): TRL's
  best-fit decreasing packing (``packing_strategy="bfd"``) into sequences of ``max_length``
  tokens. TRL then collates padding-free (each batch one flat sequence, ``position_ids``
  restarting at every row); transformers turns the restarts into a block-diagonal causal mask
  for the eager and SDPA attention (``masking_utils.find_packed_sequence_indices``), so a row
  attends only to itself on CPU as with FlashAttention on a GPU: no FlashAttention is needed.
  Rows over ``max_length`` are dropped before (``training.prepare_examples``), so BFD, which
  truncates what overflows a sequence, never cuts a row. The eval split is not packed
  (``eval_packing=False``): its loss is computed row by row as in an unpacked run and as the
  baselines' (few-shot, earlier model) are.
- **gradient checkpointing**: ``gradient_checkpointing`` (off by default, unlike TRL's).
- **precision**: :func:`resolve_precision`. ``bf16`` is mixed precision (accelerate's autocast:
  weights stay fp32); it trains on CPU too, under torch's CPU autocast.

:func:`observe_options` records, during the first training step, whether the model was
checkpointing activations and the dtype its layers computed in: the job's metrics say what was
used, not what was asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from sftflow.core.errors import ConfigError
from sftflow.tasks.finetune.backends import Hyperparameters

Precision = Literal["fp32", "bf16"]


def _cuda() -> tuple[bool, bool]:
    import torch

    cuda = torch.cuda.is_available()
    return cuda, bool(cuda and torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, *, cuda: bool | None = None, cuda_bf16: bool | None = None) -> Precision:
    """``fp32`` or ``bf16`` for ``precision`` on this machine (or the one ``cuda``/``cuda_bf16``
    describe): ``auto`` is bf16 on a CUDA device that supports it, else fp32. An explicit
    ``bf16`` on a CUDA device without bf16 is a ConfigError (before any model is loaded); on a
    CPU-only machine it trains under torch's CPU autocast."""
    if cuda is None or cuda_bf16 is None:
        cuda, cuda_bf16 = _cuda()
    if precision == "fp32":
        return "fp32"
    if precision == "auto":
        return "bf16" if cuda and cuda_bf16 else "fp32"
    if precision == "bf16":
        if cuda and not cuda_bf16:
            raise ConfigError("precision=bf16: this CUDA device does not support bf16 (it needs "
                              "compute capability 8.0 or newer); use precision=auto or fp32")
        return "bf16"
    raise ConfigError(f"unknown precision {precision!r} (known: auto, fp32, bf16)")


def eval_only(hp: Hyperparameters) -> Hyperparameters:
    """``hp`` for a trainer that only evaluates (the baselines): rows one by one, not packed, so
    nothing is cut to ``max_length`` (few-shot prompts are longer than a training row)."""
    return hp.model_copy(update={"packing": False, "gradient_checkpointing": False})


def sft_config(hp: Hyperparameters, output_dir: Path, eval_during_training: bool = False):
    """No ``max_length`` unless packing (then the packed sequences' length): the rows are
    measured and filtered before (``training.prepare_examples``), so TRL never truncates. The
    eval split is scored about ten times along the run. The loss covers the completion
    (``loss=assistant``: and the template's generation markers); the batches are drawn with
    ``data_seed = seed``."""
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps,
        learning_rate=hp.learning_rate,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        max_length=hp.max_length if hp.packing else None,
        completion_only_loss=True,
        assistant_only_loss=hp.loss == "assistant",
        packing=hp.packing,
        packing_strategy="bfd",
        eval_packing=False,
        gradient_checkpointing=hp.gradient_checkpointing,
        bf16=resolve_precision(hp.precision) == "bf16",
        fp16=False,
        logging_steps=1,
        eval_strategy="steps" if eval_during_training else "no",
        eval_steps=0.1 if eval_during_training else None,
        save_strategy="no",
        report_to="none",
        seed=hp.seed,
        data_seed=hp.seed,  # the batch order: tokens.batch_order
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataset_num_proc=None,
    )


def lora_config(hp: Hyperparameters):
    """PEFT's ``LoraConfig`` for ``method=lora``: every linear layer."""
    from peft import LoraConfig

    return LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def observe_options(trainer) -> dict[str, Any]:
    """A dict the trainer fills in its first training step: ``gradient_checkpointing`` (the
    model's own ``is_activation_checkpointing``) and ``precision`` (``fp32``, ``bf16``, ...:
    the dtype the first linear layer computed in, autocast included)."""
    import torch
    from transformers import TrainerCallback

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    seen: dict[str, Any] = {}

    def dtype_of(module, inputs, output) -> None:
        if "precision" not in seen and isinstance(output, torch.Tensor):
            seen["precision"] = names.get(output.dtype, str(output.dtype))

    class Observe(TrainerCallback):
        handle = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            linear = next((m for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
            if linear is not None:
                self.handle = linear.register_forward_hook(dtype_of)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.setdefault("gradient_checkpointing", bool(getattr(model, "is_activation_checkpointing", False)))
            if self.handle is not None:
                self.handle.remove()
                self.handle = None

    trainer.add_callback(Observe())
    return seen
