"""Row filters and the PII / secret scan."""

from __future__ import annotations

import pytest

from sftflow.tasks.build import filters
from sftflow.tasks.build.edits import draft_fields
from sftflow.tasks.build.filters import FilterConfig, approx_tokens, filter_rows


def _row(prompt: str = "Tell me about cats.", completion: str = "Cats are small felines.") -> dict:
    return {"prompt": prompt, "completion": completion, "task_id": 1, "annotation_id": 2}


@pytest.mark.parametrize(
    ("completion", "reason", "cfg"),
    [
        ("   \n\t", "empty_response", {}),
        ("  tell me ABOUT   cats. ", "response_equals_prompt", {}),
        ("ok", "too_short_chars", {"min_chars": 5}),
        ("x" * 101, "too_long_chars", {"max_chars": 100}),
        ("short", "too_short_tokens", {"min_tokens": 3}),
        ("word " * 100, "too_long_tokens", {"max_tokens": 50}),
        ("bell \x07 here", "control_characters", {}),
    ],
)
def test_each_drop_reason_is_counted_and_written_as_exclusion(completion, reason, cfg):
    out = filter_rows([_row(completion=completion), _row()], FilterConfig(**cfg))
    assert len(out.kept) == 1 and out.counts["kept"] == 1
    assert out.counts[f"dropped:{reason}"] == 1
    assert out.excluded[0]["reason"] == reason and out.excluded[0]["task_id"] == 1


def test_tabs_and_newlines_are_not_control_characters():
    out = filter_rows([_row(completion="a\tb\r\nc")], FilterConfig())
    assert len(out.kept) == 1


def test_pii_redacted_by_default_and_input_not_modified():
    row = _row(completion="Write to jane.doe@example.org or call +1 415-555-0199 today.")
    out = filter_rows([row], FilterConfig())
    assert out.kept[0]["completion"] == "Write to [EMAIL] or call [PHONE] today."
    assert out.counts["redacted:email"] == 1 and out.counts["redacted:phone"] == 1
    assert "jane.doe" in row["completion"]  # the caller's row is untouched


def test_pii_drop_policy_and_years_are_not_phones():
    rows = [_row(completion="mail me: a.b@corp.co.uk"),
            _row(completion="From 1990-2000 the population grew; call 555-0100 (7 digits).")]
    out = filter_rows(rows, FilterConfig(pii="drop"))
    assert [r["completion"][:4] for r in out.kept] == ["From"]
    assert out.counts["dropped:pii:email"] == 1
    assert out.excluded[0]["completion"] == "mail me: [EMAIL]"  # no PII in the exclusions file


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("aws key AKIAIOSFODNN7EXAMPLE ok", "aws_access_key"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_key"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "private_key"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abcdefghijkl", "bearer_token"),
        ("token ghp_" + "a" * 36, "github_token"),
        ("key AIza" + "B" * 35, "gcp_api_key"),
        ("sk-proj-" + "c" * 40, "openai_key"),
    ],
)
def test_secrets_dropped_by_default_and_redacted_in_exclusions(text, kind):
    out = filter_rows([_row(completion=f"Here: {text}")], FilterConfig())
    assert not out.kept and out.counts[f"dropped:secret:{kind}"] == 1
    excluded = out.excluded[0]["completion"]
    assert f"[{kind.upper()}]" in excluded or "[" in excluded
    assert text not in excluded


def test_secret_redact_and_off_policies():
    row = _row(completion="use AKIAIOSFODNN7EXAMPLE")
    assert filter_rows([row], FilterConfig(secrets="redact")).kept[0]["completion"] == (
        "use [AWS_ACCESS_KEY]")
    assert filter_rows([row], FilterConfig(secrets="off")).kept[0]["completion"] == row["completion"]


def test_approx_tokens_counts_bytes():
    assert approx_tokens("abcd" * 10) == 10
    assert approx_tokens("中文字") == 3  # 9 UTF-8 bytes


def test_exclusions_are_redacted_whatever_the_reason_and_policy():
    from sftflow.tasks.build.filters import FilterConfig, filter_rows, redact_exclusion

    key = "AKIAIOSFODNN7EXAMPLE"
    echo = {"prompt": f"say {key}", "completion": f"say {key}", "task_id": 1, "annotation_id": 1}
    long = {"prompt": "x", "completion": "mail a@example.com " + "y" * 50, "task_id": 2,
            "annotation_id": 2}
    res = filter_rows([echo, long], FilterConfig(max_chars=40, secrets="off", pii="off"))
    assert res.counts["dropped:response_equals_prompt"] == 1
    assert res.counts["dropped:too_long_chars"] == 1
    text = repr(res.excluded)
    assert key not in text and "a@example.com" not in text and "[EMAIL]" in text
    export = {"stage": "export", "reason": "unknown_from_name", "prompt": f"k {key}",
              "completion": None, "detail": ""}
    assert redact_exclusion(export)["prompt"] == "k [AWS_ACCESS_KEY]"
    assert export["prompt"] == f"k {key}"  # a copy: the input is not changed


def _drafted(i: int, completion: str, draft: tuple[str, str | None] | None = None) -> dict:
    return {"prompt": f"prompt {i}", "completion": completion, "prompt_id": f"p{i}",
            "task_id": i, "annotation_id": 100 + i, "annotator": "1",
            "updated_at": "2026-01-01T00:00:00Z", "ground_truth": False,
            **draft_fields(draft, completion)}


def _draft_rows() -> list[dict]:
    return [
        _drafted(1, "Paris.", ("job-a", "Paris.")),  # accepted unchanged
        _drafted(2, "abce", ("job-a", "abcd")),
        _drafted(3, "sitting", ("job-a", "kitten")),
        _drafted(4, "yes", ("job-b", "yes")),
        _drafted(5, "no", ("job-b", "no")),
        _drafted(6, "text", ("job-c", None)),  # the draft had no response text
        _drafted(7, "written from nothing"),
    ]


def test_the_default_policy_excludes_accepted_drafts_and_include_keeps_them():
    rows = _draft_rows()
    assert filters.DEFAULT_DRAFT_POLICY == "exclude"
    kept, excluded = filters.apply_draft_policy(rows)
    assert [r["task_id"] for r in kept] == [2, 3, 6, 7]
    assert [(e["task_id"], e["annotation_id"], e["stage"], e["reason"]) for e in excluded] == [
        (1, 101, "filter", "accepted_draft_unchanged"),
        (4, 104, "filter", "accepted_draft_unchanged"),
        (5, 105, "filter", "accepted_draft_unchanged")]
    assert "job-a" in excluded[0]["detail"] and excluded[0]["prompt"] is None
    assert filters.apply_draft_policy(rows, "include") == (rows, [])
    with pytest.raises(ValueError, match="include"):
        filters.apply_draft_policy(rows, "sometimes")  # type: ignore[arg-type]
