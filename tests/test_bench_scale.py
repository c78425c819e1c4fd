"""The arithmetic of bench/scale.py: the corpus past the shared rows, the power fits, their
projections and where each resource runs out. Pure functions only; no project is built here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "bench" / "scale.py"
_spec = importlib.util.spec_from_file_location("bench_scale", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


def test_a_power_law_is_fitted_exactly_and_projected():
    ns = [55_000.0, 150_000.0, 300_000.0]
    c, k = bench.power_fit(ns, [2e-3 * n ** 1.1 for n in ns])
    assert k == pytest.approx(1.1) and c == pytest.approx(2e-3)
    assert bench.power_fit([1.0], [2.0]) is None  # one point fits nothing
    assert bench.power_fit([2.0, 2.0], [1.0, 3.0]) is None  # nor one size twice


def _size(n: int, rss_per_task_mb: float) -> dict:
    build = {"seconds": n / 500, "peak_rss_mb": 200 + n * rss_per_task_mb, "bytes_written": n * 1000,
             "stage_seconds": {"export": n / 1000}}
    return {"tasks": n, "ingest": {"seconds": n / 3000, "peak_rss_mb": 600, "bytes_written": n * 50},
            "scratch": build, "incremental": {**build, "seconds": 10.0}, "full": build,
            "load_dataset": {"seconds": n / 20_000, "peak_rss_mb": 400}}


def test_the_first_limit_is_the_memory_of_a_build_that_grows_with_the_project():
    sizes = {str(n): _size(n, 0.02) for n in (55_000, 150_000, 300_000)}
    fits = bench.fit_all(sizes)
    assert fits["scratch_s"]["exponent"] == pytest.approx(1.0, abs=1e-3)
    assert fits["incremental_s"]["exponent"] == pytest.approx(0.0, abs=1e-3)
    assert fits["ingest_peak_rss_mb"]["projected"]["1000000"] == pytest.approx(600, rel=1e-3)
    found = bench.limits(fits, memory_gb=24, disk_free_gb=50)
    first = found[0]
    assert first["figure"].endswith("_peak_rss_mb") and "memory" in first["what"]
    # 200 MB + 0.02 MB a task, fitted as a power: it passes 24 GB between 1M and 2M tasks
    assert 1_000_000 < first["runs_out_at_tasks"] < 2_000_000
    assert [f["runs_out_at_tasks"] for f in found] == sorted(f["runs_out_at_tasks"] for f in found)


def test_rows_past_the_shared_corpus_join_halves_of_two_different_real_rows(monkeypatch):
    real = [{"prompt": f"p{i}a p{i}b p{i}c p{i}d", "completion": f"c{i}a c{i}b c{i}c c{i}d"}
            for i in range(5)]
    monkeypatch.setattr(bench, "load_rows", lambda limit: list(real))
    rows = bench.corpus(12)
    assert rows[:5] == real and len(rows) == 12
    for r in rows[5:]:
        a, b = r["prompt"][1], r["prompt"][-2]  # the rows the two halves come from
        assert a != b and r["prompt"] == f"p{a}a p{a}b p{b}c p{b}d"
        assert r["completion"] == f"c{a}a c{a}b c{b}c c{b}d"  # as long as a real row
    assert bench.corpus(12) == rows  # seeded


def test_memory_lines_split_a_fixed_part_from_a_part_per_task_and_say_where_memory_ends():
    sizes = {str(n): {"scratch": {"seconds": 1.0, "peak_rss_mb": 500 + n / 100,
                                  "bytes_written": 1, "stage_seconds": {}}}
             for n in (50_000, 150_000, 300_000)}
    line = bench.memory_lines(sizes, memory_gb=24)["scratch"]
    assert line["fixed_mb"] == 500 and line["mb_per_1k_tasks"] == 10.0
    assert line["projected_mb"]["1000000"] == 10_500
    assert line["runs_out_at_tasks"] == int((24 * 1024 - 500) / 0.01)
    assert bench.linear_fit([1.0], [2.0]) is None
