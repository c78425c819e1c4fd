"""tasks.build.edits: edit similarity, a row's draft columns, annotator pairs of a task."""

from __future__ import annotations

import pytest

from sftflow.tasks.build import edits


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("same text", "same text", 1.0),
    ("", "", 1.0),
    ("abcd", "abce", 0.75),  # one substitution in four characters
    ("kitten", "sitting", 1 - 3 / 7),  # the textbook distance 3, over the longer length 7
    ("abcdefgh", "hgfedcba", 0.0),  # nothing kept in place (fuzz.ratio says 0.125)
    ("a", "", 0.0),
])
def test_edit_similarity_is_one_minus_levenshtein_over_the_longer_length(a, b, expected):
    assert edits.edit_similarity(a, b) == pytest.approx(expected)
    assert edits.edit_similarity(b, a) == pytest.approx(expected)


def test_draft_fields_of_an_unchanged_an_edited_a_textless_and_no_draft():
    assert edits.draft_fields(("job-1", "Paris."), "Paris.") == {
        "draft_model": "job-1", "draft_similarity": 1.0, "draft_unchanged": True}
    assert edits.draft_fields(("job-1", "abcd"), "abce") == {
        "draft_model": "job-1", "draft_similarity": 0.75, "draft_unchanged": False}
    assert edits.draft_fields(("job-2", None), "anything") == {
        "draft_model": "job-2", "draft_similarity": None, "draft_unchanged": None}
    assert edits.draft_fields(None, "anything") == edits.NO_DRAFT
    # Whitespace is not an edit (the text is still the model's), though it counts in similarity.
    assert edits.draft_fields(("job-1", "Paris is  big."), "Paris is big.\n") == {
        "draft_model": "job-1", "draft_similarity": pytest.approx(1 - 2 / 14),
        "draft_unchanged": True}
    assert edits.draft_fields(("job-1", "Paris."), "Paris!")["draft_unchanged"] is False


def test_task_pairs_are_every_pair_of_different_annotators_sorted():
    pairs = edits.task_pairs([("b", "abcd"), ("a", "abce"), ("b", "abcd again"), ("c", "abcd")])
    # "abce" -> "abcd again": 1 substitution + 6 insertions over 10; "abcd again" -> "abcd":
    # 6 deletions over 10.
    assert pairs == [("a", "b", pytest.approx(0.3)), ("a", "b", 0.75), ("a", "c", 0.75),
                     ("b", "c", pytest.approx(0.4)), ("b", "c", 1.0)]
    assert edits.task_pairs([("a", "x"), ("a", "y")]) == []  # one annotator twice: no pair
    assert edits.task_pairs([("a", "x")]) == []
