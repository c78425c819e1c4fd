"""The accounting of bench/train_throughput.py: tokens/s after warm-up, MFU, the peak-FLOPs
table. Pure functions only; no training runs here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "bench" / "train_throughput.py"
_spec = importlib.util.spec_from_file_location("bench_train_throughput", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclasses look their module up
_spec.loader.exec_module(bench)

QWEN3_0_6B_PARAMS = 596_049_920  # the random Qwen3-0.6B-shaped model, tied embeddings


def test_peak_flops_by_device_name():
    assert bench.peak_flops("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989e12)
    assert bench.peak_flops("NVIDIA H100 PCIe") == ("H100 PCIe", 756e12)
    assert bench.peak_flops("NVIDIA H200") == ("H200", 989e12)
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB") == ("A100", 312e12)
    assert bench.peak_flops("NVIDIA GeForce RTX 4090") == (None, None)


def test_the_anchor_figures_reproduce_with_attention_flops():
    """26k tok/s on an H100 at 8k is 16.8 % MFU once causal attention is counted (Qwen3-0.6B:
    28 layers, 16 heads of 128), and about 9.4 % with 6N alone."""
    fpt = bench.flops_per_token(QWEN3_0_6B_PARAMS, 28, 16 * 128, 8192)
    peak = bench.peak_flops("NVIDIA H100 80GB HBM3")[1]
    assert bench.mfu(fpt["with_attention"], 26_000, peak) == pytest.approx(0.168, abs=0.0005)
    assert bench.mfu(fpt["six_n"], 26_000, peak) == pytest.approx(6 * QWEN3_0_6B_PARAMS * 26_000 / 989e12)
    assert bench.mfu(fpt["six_n"], 26_000, None) is None


def test_tokens_per_second_leaves_the_warmup_steps_out():
    # step 0 (warm-up) is slow and its tokens do not count; steps 1-3 take 1 s each
    ends = [10.0, 11.0, 12.0, 13.0]
    tokens = [9999, 100, 200, 300, 400]  # one batch drawn ahead of the last step
    assert bench.tokens_per_second(ends, tokens, warmup=1) == pytest.approx(600 / 3.0)
    with pytest.raises(ValueError):
        bench.tokens_per_second(ends[:1], tokens, warmup=1)
