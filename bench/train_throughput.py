"""Benchmark: training throughput of sftflow's TRL SFT path (tokens/s, MFU, peak memory).

How to run it:

* **CPU** (here, about a minute): ``.venv/bin/python bench/train_throughput.py``. A tiny shape
  (hidden 64, 2 layers) at 256 and 512 tokens; the JSON says ``"cpu: not a GPU figure"``.
* **GPU** (one H100/H200, about 3-6 minutes): ``bash bench/gpu_throughput.sh`` on the GPU
  machine (it finds a Python with CUDA torch, installs the carried wheels, then runs
  ``python bench/train_throughput.py --gpu`` and prints the JSON path). Through the device
  tool: first, here, ``bash bench/gpu_throughput.sh --fetch-wheels`` (wheels into ``.whl/``,
  git-ignored through ``.git/info/exclude``), then ``run`` with ``carry=[".whl"]`` and the
  command ``bash bench/gpu_throughput.sh``; the JSON comes back under ``$OUT``.

What is measured: a randomly initialised model shaped like Qwen3-0.6B (hidden 1024, 28
layers, 16 heads of 128, 8 KV heads, intermediate 3072, vocab 151936, tied embeddings; no
download) saved to a temp folder in bf16 like the hub checkpoint, with a tokenizer trained on
the spot by ``tasks/finetune/tiny_model.py`` (its chat template). Each configuration goes
through sftflow's own pieces: ``load_tokenizer``, ``prepare_examples`` (chat format, length
check), ``_load_model`` and ``trl_config.sft_config`` (the SFTConfig sftflow trains with, here at
``precision=bf16`` and gradient checkpointing on, completion-only loss, ``logging_steps=1``); only
``packing`` / ``max_length`` (and, for the extra rows, ``gradient_checkpointing``) are set on
that config before TRL's ``SFTTrainer`` is built from it. Packing is TRL's best-fit decreasing
(``packing_strategy="bfd"``, padding-free).

Rows: real prompt/completion pairs (``../shared/data/t0_train_50k.jsonl.gz``, read in place) as
user/assistant chat rows. Each step has the same token budget (``--tokens-per-step``): packed,
``budget / seq_len`` sequences of ``seq_len``; unpacked, as many rows as fit when padded to the
longest row kept, so both sides hold about the same memory.

Figures per configuration: tokens/s = non-padding tokens trained per second after the warm-up
steps; MFU = 6 * params * tokens/s / peak bf16 dense FLOP/s (the device's, from
:data:`PEAK_BF16_FLOPS`), and ``mfu_with_attention`` adds the causal attention FLOPs
(6 * layers * attention width * seq_len per token), the accounting the anchor's 16.8 % uses;
peak memory = ``torch.cuda.max_memory_allocated`` on a GPU, the process's ``ru_maxrss`` on CPU
(monotonic: later configurations include earlier ones).

Writes ``bench/results/train_throughput.json`` (``--out`` for another path).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("SFTFLOW_SHARED_DATA", ROOT.parent / "shared" / "data")) / "t0_train_50k.jsonl.gz"
RESULTS = ROOT / "bench" / "results" / "train_throughput.json"
CPU_LABEL = "cpu: not a GPU figure"

#: Peak dense bf16 FLOP/s (no sparsity) by device; the first key found in the device's name wins.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 SXM": 989e12, "H200": 989e12, "A100": 312e12}

#: The published anchor: Qwen3-0.6B full SFT on one H100 at 8k tokens, another trainer.
ANCHOR = {"tokens_per_s": 26_000.0, "mfu": 0.168, "seq_len": 8192,
          "what": "Qwen3-0.6B full SFT, one H100, 8k sequence length (another trainer)",
          "mfu_accounting": "6 * params + causal attention (6 * layers * 2048 * 8192) per token: "
                            "26k tok/s gives 16.8 % of 989 TFLOP/s"}

#: Qwen3-0.6B's shape (its config.json); the weights are random.
QWEN3_0_6B = {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
              "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1_000_000.0,
              "rms_norm_eps": 1e-6}
#: The CPU shape: same architecture, tiny (the vocab is the tokenizer's).
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "intermediate_size": 192, "vocab_size": None, "tie_word_embeddings": True}


@dataclass(frozen=True)
class Mode:
    name: str              # "gpu" or "cpu"
    shape: dict
    seq_lens: tuple[int, ...]
    tokens_per_step: int
    steps: int             # optimizer steps per configuration, warm-up included
    warmup: int
    tokenizer_vocab: int
    weights_dtype: str     # what the random checkpoint is saved in
    extra_no_gc: bool      # also packed runs without gradient checkpointing


GPU = Mode("gpu", QWEN3_0_6B, (2048, 8192), 8192, 20, 5, 16384, "bfloat16", True)
CPU = Mode("cpu", TINY, (256, 512), 1024, 6, 2, 2048, "float32", False)


# -- accounting: pure functions ----------------------------------------------------------------------
def peak_flops(device_name: str) -> tuple[str | None, float | None]:
    """``(table key, peak bf16 dense FLOP/s)`` for a device name such as ``"NVIDIA H100 80GB
    HBM3"`` (an H100 without "PCIe" in its name is the SXM part); ``(None, None)`` if unknown."""
    name = device_name.upper()
    if "H100" in name:
        key = "H100 PCIe" if "PCIE" in name else "H100 SXM"
        return key, PEAK_BF16_FLOPS[key]
    for key in ("H200", "A100"):
        if key in name:
            return key, PEAK_BF16_FLOPS[key]
    return None, None


def flops_per_token(params: int, layers: int, attention_width: int, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token: ``6N`` (forward + backward through every weight) and that plus
    causal attention, ``6 * layers * attention_width * seq_len`` (QK^T and AV, half the matrix)."""
    six_n = 6.0 * params
    return {"six_n": six_n, "with_attention": six_n + 6.0 * layers * attention_width * seq_len}


def tokens_per_second(step_ends: list[float], step_tokens: list[int], warmup: int) -> float:
    """Tokens of the steps after ``warmup`` over the time from the end of the last warm-up step
    to the end of the last step (``step_ends[i]`` is when step ``i`` finished)."""
    if warmup < 1 or len(step_ends) <= warmup or len(step_tokens) < len(step_ends):
        raise ValueError(f"need more than {warmup} timed steps and a token count for each")
    seconds = step_ends[-1] - step_ends[warmup - 1]
    return sum(step_tokens[warmup:len(step_ends)]) / seconds


def mfu(flops_token: float, tokens_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (None without one)."""
    return None if not peak else flops_token * tokens_s / peak


# -- the machine ---------------------------------------------------------------------------------------
def machine() -> dict:
    import psutil

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_1m": os.getloadavg()[0],
            "note": "see load_avg_1m: other work on the machine slows the CPU figures"}


def device_block(mode: Mode) -> dict:
    import torch

    if mode.name == "cpu":
        return {"name": _cpu_name(), "kind": "cpu", "label": CPU_LABEL,
                "peak_flops_key": None, "peak_bf16_flops": None}
    name = torch.cuda.get_device_name(0)
    key, peak = peak_flops(name)
    return {"name": name, "kind": "cuda", "peak_flops_key": key, "peak_bf16_flops": peak,
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "bf16_supported": torch.cuda.is_bf16_supported()}


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def versions() -> dict:
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "trl": trl.__version__, "transformers": transformers.__version__}


# -- data and model --------------------------------------------------------------------------------------
def chat_rows(tokens_wanted: int, chars_per_token: float = 3.0) -> tuple[list, str]:
    """``(rows, source)``: user/assistant rows from the shared T0 file (read in place), enough
    text for about ``tokens_wanted``; generated rows where the file is absent."""
    if not DATA.exists():
        return generated_rows(int(tokens_wanted * chars_per_token)), "generated (no t0_train_50k.jsonl.gz)"
    rows, chars = [], 0
    with gzip.open(DATA, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if not rec.get("prompt", "").strip() or not rec.get("completion", "").strip():
                continue
            rows.append([{"role": "user", "content": rec["prompt"]},
                         {"role": "assistant", "content": rec["completion"]}])
            chars += len(rec["prompt"]) + len(rec["completion"])
            if chars >= tokens_wanted * chars_per_token:
                break
    return rows, f"{DATA.name} (first {len(rows)} rows)"


_WORD_TEXT = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
          "have an they you were her she there one all we their can has been if more when will would who so "
          "no model data answer question summary article passage sentence explain write list")
_WORDS = _WORD_TEXT.split()


def generated_rows(chars_wanted: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Chat rows of log-normal lengths (prompts ~250 words, answers ~60, long tails) from a
    small vocabulary: for a machine without ../shared/data."""
    import random

    rng = random.Random(seed)
    words = _WORDS
    rows, chars = [], 0
    while chars < chars_wanted:
        prompt = " ".join(rng.choices(words, k=max(5, int(rng.lognormvariate(5.3, 0.8)))))
        answer = " ".join(rng.choices(words, k=max(1, int(rng.lognormvariate(3.8, 1.0)))))
        rows.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
        chars += len(prompt) + len(answer)
    return rows


def build_model(folder: Path, mode: Mode, texts: list[str], use_cuda: bool) -> dict:
    """A tokenizer (and chat template) from ``tiny_model.build_tiny_model``, then a random
    Qwen3 model of ``mode.shape`` saved over its tiny model, in ``mode.weights_dtype``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sftflow.tasks.finetune.tiny_model import build_tiny_model
    from sftflow.tasks.finetune.training import load_tokenizer

    t0 = time.perf_counter()
    max_len = max(mode.seq_lens)
    build_tiny_model(folder, texts, vocab_size=mode.tokenizer_vocab, hidden_size=32, num_layers=1,
                     num_heads=2, max_position_embeddings=max_len, chat=True)
    tok = load_tokenizer(str(folder))
    shape = {**mode.shape, "vocab_size": mode.shape["vocab_size"] or len(tok)}
    config = Qwen3Config(**shape, max_position_embeddings=max_len, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if use_cuda else "cpu"):
        model = Qwen3ForCausalLM(config)
    model.to(getattr(torch, mode.weights_dtype)).save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"architecture": "Qwen3ForCausalLM (random init)", **shape, "params": params,
            "attention_width": shape["num_attention_heads"] * shape["head_dim"],
            "weights_dtype": mode.weights_dtype, "tokenizer_vocab": len(tok),
            "build_s": round(time.perf_counter() - t0, 1)}


# -- one configuration -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    seq_len: int
    packing: bool
    batch_size: int
    gradient_checkpointing: bool = True


class StepClock:
    """Batch token counts (wrapping the trainer's collator: batch ``i`` is step ``i``'s with no
    gradient accumulation) and step end times (a callback, after a CUDA sync)."""

    def __init__(self, trainer, use_cuda: bool):
        import torch
        from transformers import TrainerCallback

        self.tokens: list[int] = []
        self.loss_tokens: list[int] = []
        self.padded: list[int] = []
        self.ends: list[float] = []
        collate, clock = trainer.data_collator, self

        def counted(examples):
            batch = collate(examples)
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            clock.tokens.append(int(mask.sum()) if mask is not None else int(ids.numel()))
            clock.loss_tokens.append(int((batch["labels"] != -100).sum()))
            clock.padded.append(int(ids.numel()))
            return batch

        class Ends(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if use_cuda:
                    torch.cuda.synchronize()
                clock.ends.append(time.perf_counter())

        trainer.data_collator = counted
        trainer.add_callback(Ends())


def run_case(model_dir: Path, rows: list, case: Case, mode: Mode, model_info: dict, peak: float | None,
             workdir: Path, use_cuda: bool) -> dict:
    """Train ``mode.steps`` steps of ``case`` through sftflow's pieces; its figures."""
    import torch
    from trl import SFTTrainer

    from sftflow.tasks.finetune import training, trl_config
    from sftflow.tasks.finetune.backends import Hyperparameters

    hp = Hyperparameters(max_steps=mode.steps, batch_size=case.batch_size, max_length=case.seq_len,
                         learning_rate=1e-5, precision="bf16", gradient_checkpointing=True)
    tokenizer = training.load_tokenizer(str(model_dir))
    _, examples, lengths = training.prepare_examples({"train": rows}, tokenizer, hp)
    model = training._load_model(str(model_dir))
    args = trl_config.sft_config(hp, workdir / "trainer")
    # Set on sftflow's own SFTConfig: SFTTrainer reads these when it is built / trains.
    args.packing = case.packing
    args.max_length = case.seq_len if case.packing else None
    if args.gradient_checkpointing != case.gradient_checkpointing:
        args.gradient_checkpointing = case.gradient_checkpointing
    trainer = SFTTrainer(model=model, args=args, train_dataset=examples["train"], processing_class=tokenizer)
    training._quiet(trainer)
    clock = StepClock(trainer, use_cuda)
    if use_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    steps = len(clock.ends)
    tok_s = tokens_per_second(clock.ends, clock.tokens, mode.warmup)
    fpt = flops_per_token(model_info["params"], model_info["num_hidden_layers"],
                          model_info["attention_width"], case.seq_len)
    peak_mem = (torch.cuda.max_memory_allocated() if use_cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    measured = slice(mode.warmup, steps)
    result = {
        **asdict(case), "grad_accumulation": args.gradient_accumulation_steps,
        "dtype": "bf16 autocast" if args.bf16 else "fp32", "weights_dtype": str(model.dtype).replace("torch.", ""),
        "attn_implementation": model.config._attn_implementation,
        "packing_strategy": args.packing_strategy if case.packing else None,
        "steps": steps, "warmup_steps": mode.warmup, "train_rows": len(examples["train"]),
        "rows_dropped_over_seq_len": lengths.rows_over_max_length,
        "tokens_per_s": round(tok_s, 1),
        "loss_tokens_per_s": round(tok_s * sum(clock.loss_tokens[measured]) / sum(clock.tokens[measured]), 1),
        "mean_tokens_per_step": round(sum(clock.tokens[measured]) / (steps - mode.warmup), 1),
        "padding_fraction": round(1 - sum(clock.tokens[measured]) / sum(clock.padded[measured]), 4),
        "mfu": _round(mfu(fpt["six_n"], tok_s, peak)),
        "mfu_with_attention": _round(mfu(fpt["with_attention"], tok_s, peak)),
        "peak_memory_gib": round(peak_mem / 2**30, 3),
        "peak_memory_source": "torch.cuda.max_memory_allocated" if use_cuda else "ru_maxrss (process)",
        "train_loss": round(float(out.training_loss), 4), "train_wall_s": round(wall, 1),
    }
    del trainer, model
    gc.collect()
    if use_cuda:
        torch.cuda.empty_cache()
    return result


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# -- the run ------------------------------------------------------------------------------------------------
def cases(mode: Mode, longest_row: dict[int, int]) -> list[Case]:
    """Packing off and on at each length (same tokens per step); on GPU, packed without
    gradient checkpointing too."""
    out = []
    for seq in mode.seq_lens:
        out.append(Case(seq, False, max(1, mode.tokens_per_step // longest_row[seq])))
        out.append(Case(seq, True, max(1, mode.tokens_per_step // seq)))
    if mode.extra_no_gc:
        out += [Case(seq, True, max(1, mode.tokens_per_step // seq), False) for seq in mode.seq_lens]
    return out


def row_lengths(model_dir: Path, rows: list) -> list[int]:
    """Each row's tokens as sftflow measures them (chat template, prompt + completion)."""
    from sftflow.tasks.finetune import training

    tok = training.load_tokenizer(str(model_dir))
    return [training.token_length(tok, training.to_example(r, "chat")) for r in rows]


def anchor_comparison(results: list[dict]) -> dict | None:
    """Ours at 8k (packed, sftflow's default gradient checkpointing, and the best packed) against
    the anchor."""
    at = [r for r in results if r["seq_len"] == ANCHOR["seq_len"] and r["packing"]]
    if not at:
        return None
    default = next((r for r in at if r["gradient_checkpointing"]), at[0])
    best = max(at, key=lambda r: r["tokens_per_s"])

    def vs(r: dict) -> dict:
        return {"gradient_checkpointing": r["gradient_checkpointing"], "tokens_per_s": r["tokens_per_s"],
                "mfu_with_attention": r["mfu_with_attention"], "mfu_6n": r["mfu"],
                "tokens_per_s_ratio_to_anchor": round(r["tokens_per_s"] / ANCHOR["tokens_per_s"], 3)}

    return {"anchor": ANCHOR, "ours_sftflow_default": vs(default), "ours_best": vs(best)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--gpu", action="store_true", help="Qwen3-0.6B shape at 2k and 8k (needs CUDA).")
    which.add_argument("--cpu", action="store_true", help="Tiny shape on CPU (the default without CUDA).")
    ap.add_argument("--steps", type=int, help="Steps per configuration, warm-up included.")
    ap.add_argument("--warmup", type=int, help="Warm-up steps left out of tokens/s.")
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets

    datasets.disable_progress_bars()

    use_cuda = torch.cuda.is_available() and not args.cpu
    if args.gpu and not use_cuda:
        raise SystemExit(f"--gpu: torch sees no CUDA device (torch {torch.__version__})")
    if not use_cuda:  # one thread: two spinning on a shared 2-core machine cost more than they give
        torch.set_num_threads(1)
    mode = GPU if use_cuda else CPU
    mode = Mode(**{**asdict(mode), "steps": args.steps or mode.steps, "warmup": args.warmup or mode.warmup})
    device = device_block(mode)
    rows, source = chat_rows(mode.tokens_per_step * mode.steps * 3)  # headroom: no epoch repeats
    texts = [m["content"] for r in rows[:3000] for m in r]
    results = []
    with tempfile.TemporaryDirectory(prefix="sftflow-throughput-") as tmp:
        model_dir = Path(tmp) / "model"
        model_info = build_model(model_dir, mode, texts, use_cuda)
        lengths = row_lengths(model_dir, rows)
        longest = {s: max(n for n in lengths if n <= s) for s in mode.seq_lens}
        print(f"{mode.name}: {model_info['params'] / 1e6:.1f} M params, {len(rows)} rows "
              f"(mean {sum(lengths) / len(lengths):.0f} tokens); longest kept {longest}", flush=True)
        for case in cases(mode, longest):
            r = run_case(model_dir, rows, case, mode, model_info, device["peak_bf16_flops"], Path(tmp), use_cuda)
            results.append(r)
            print(json.dumps({k: r[k] for k in ("seq_len", "packing", "batch_size", "gradient_checkpointing",
                                                "tokens_per_s", "mfu", "mfu_with_attention", "peak_memory_gib")}),
                  flush=True)
    report = {
        "benchmark": "train_throughput", "mode": mode.name,
        "label": CPU_LABEL if mode.name == "cpu" else f"gpu: {device['name']}",
        "machine": {**machine(), "load_avg_1m_at_start": load_at_start}, "device": device,
        "versions": versions(), "model": model_info,
        "data": {"source": source, "rows": len(rows), "mean_row_tokens": round(sum(lengths) / len(lengths), 1),
                 "max_row_tokens": max(lengths), "tokens_per_step_budget": mode.tokens_per_step},
        "configs": results,
        "anchor_comparison": anchor_comparison(results) if mode.name == "gpu" else None,
        "total_s": round(time.perf_counter() - t_start, 1),
        "notes": notes(mode),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def notes(mode: Mode) -> list[str]:
    out = [
        ("tokens_per_s counts non-padding tokens the model trained on (attention-mask ones; padding-free "
        "packed batches hold no padding), warm-up steps left out; loss_tokens_per_s counts the ones in the loss"),
        ("mfu = 6 * params * tokens_per_s / peak; mfu_with_attention adds causal attention FLOPs at seq_len "
        "(the anchor's accounting); packed sequences attend within their rows only, so it overstates work done"),
        ("unpacked batch size: rows that fit the token budget when padded to the longest row kept; rows longer "
        "than seq_len are dropped by sftflow's length check (never truncated)"),
        ("the tokenizer is trained on these rows (smaller vocab than Qwen's): a row is somewhat more tokens than "
        "with Qwen's tokenizer; the model's vocab (lm head) is Qwen3-0.6B's"),
    ]
    if mode.name == "cpu":
        out[-1] = "the tokenizer is trained on these rows; the tiny model's vocab is the tokenizer's"
        out.insert(0, f"{CPU_LABEL}: a tiny shape to prove the path runs (one torch thread); peak memory "
                      "is the process's ru_maxrss")
    return out


if __name__ == "__main__":
    main()
