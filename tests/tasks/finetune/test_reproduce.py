"""The verdict of ``sftflow models reproduce`` on two records of a stream (pure: the real
re-tokenisation from the bucket runs in tests/flows/test_finetune.py's trl test)."""

from __future__ import annotations

from sftflow.tasks.finetune import tokens
from sftflow.tasks.finetune.reproduce import compare, summary

ROWS = [([1, 2, 3, 4], [-100, -100, 3, 4]), ([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, 7]),
        ([1, 8, 9], [-100, -100, 9]), ([1, 2, 9], [-100, 2, 9])]


def _record(rows=ROWS, **changes) -> tokens.TokenRecord:
    record = tokens.TokenRecord(
        tokenizer="/models/tiny", tokenizer_sha256="a" * 64, chat_template_sha256="b" * 64, format="chat",
        loss="completion", seed=42, batch_size=2, coverage=tokens.coverage(rows, 64),
        versions={"trl": "1.16.0", "transformers": "5.23.0"}, batches=tokens.batch_hashes(rows, 2, 42),
        batches_sha256="c" * 64, rows_sha256=tokens.batch_sha256(rows))
    return record.model_copy(update=changes)


def test_the_same_stream_is_identical_even_with_another_library_version():
    same = compare("ft-x", "qa", "v1", _record(), _record(versions={"trl": "1.17.0", "transformers": "5.23.0"}))
    assert same.identical and same.first_differing_batch is None and same.batches_compared == 4
    assert same.differences == ["trl 1.16.0 -> 1.17.0 (library version)"]
    assert summary(same)[0] == "ft-x (qa@v1): token stream identical"


def test_a_different_stream_names_its_first_differing_batch_and_what_changed():
    order = tokens.batch_order(len(ROWS), 2, 42)
    changed = list(ROWS)
    row = order[1][0]  # a row of the second batch gets one more trained token
    changed[row] = (ROWS[row][0], list(ROWS[row][0]))
    other = _record(changed, tokenizer_sha256="d" * 64)
    verdict = compare("ft-x", "qa", "v1", _record(), other)
    assert not verdict.identical and verdict.first_differing_batch == 1 and not verdict.rows_identical
    assert verdict.differences[0].startswith("batch 1 differs (of the first 4)")
    assert "the train rows' tokens or labels differ" in verdict.differences
    assert f"tokenizer_sha256: recorded {'a' * 64}, now {'d' * 64}" in verdict.differences
    assert any(d.startswith("mask coverage: ") and "trained_tokens_total" in d for d in verdict.differences)
    assert "  first differing batch: 1" in summary(verdict)
    # a row beyond the hashed batches differs: the batches match, the stream does not
    late = compare("ft-x", "qa", "v1", _record(), _record(rows_sha256="e" * 64))
    assert not late.identical and late.first_differing_batch is None and not late.rows_identical
