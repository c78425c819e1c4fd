"""tasks.build.draft_return: seconds of annotator time saved by model drafts, from Label
Studio's ``lead_time`` and ``parent_prediction``, like for like by prompt length (figures
checked by hand). Pure: no services."""

from __future__ import annotations

import pytest

from sftflow.tasks.build import draft_return as dr
from sftflow.tasks.build.edits import draft_fields
from sftflow.tasks.versions import formats


def _row(i: int, prompt_chars: int, draft: tuple[str, str] | None = None, completion: str = "ok",
         annotator: str = "1", at: str = "2026-01-01T00:00:00Z") -> dict:
    return {"prompt": "p" * prompt_chars, "completion": completion, "prompt_id": f"p{i}",
            "task_id": i, "annotation_id": 100 + i, "annotator": annotator, "updated_at": at,
            "ground_truth": False, **draft_fields(draft, completion)}


def test_prompt_lengths_fall_in_power_of_two_buckets():
    edges = (0, 64, 128)
    assert [dr.length_bucket(n, edges) for n in (0, 63, 64, 127, 128, 10_000)] == [0, 0, 1, 1, 2, 2]
    assert [dr.bucket_label(i, edges) for i in range(3)] == ["0-63", "64-127", "128+"]


def test_drafted_tasks_are_compared_with_undrafted_ones_of_the_same_prompt_length():
    """Short prompts take 10 s undrafted, long ones 100 s. Drafted: one short (6 s) and three
    long (40, 50, 60 s). A pooled median would compare 50 s with 55 s (saved 5 s); like for
    like, weighted by the drafted tasks' buckets (1/4 short, 3/4 long): without a draft
    0.25 x 10 + 0.75 x 100 = 77.5 s, with 0.25 x 6 + 0.75 x 50 = 39 s, 38.5 s saved a task."""
    rows = [_row(1, 10), _row(2, 10), _row(3, 10), _row(4, 200), _row(5, 200),
            _row(6, 10, ("m1", "ok")), _row(7, 200, ("m1", "ok")),
            _row(8, 200, ("m1", "x")), _row(9, 200, ("m1", "ok"))]
    times = {101: 9.0, 102: 10.0, 103: 11.0, 104: 100.0, 105: 100.0,
             106: 6.0, 107: 40.0, 108: 50.0, 109: 60.0}
    out = dr.draft_return(rows, times, edges=(0, 64, 128))
    assert out["baseline"]["by_bucket"] == {"0-63": {"annotations": 3, "median_s": 10.0},
                                            "128+": {"annotations": 2, "median_s": 100.0}}
    m = out["models"]["m1"]
    assert (m["annotations"], m["compared"], m["untimed"], m["no_baseline"]) == (4, 4, 0, 0)
    assert m["median_without_draft_s"] == pytest.approx(77.5)
    assert m["median_with_draft_s"] == pytest.approx(39.0)
    assert m["saved_per_task_s"] == pytest.approx(38.5)
    assert m["saved_total_s"] == pytest.approx(154.0)
    assert out["saved_total_s"] == pytest.approx(154.0)
    assert out["period"] == {"from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}


def test_annotations_without_lead_time_are_counted_apart_never_guessed():
    """API-made annotations carry no lead_time: counted as untimed, in no median."""
    rows = [_row(1, 10), _row(2, 10), _row(3, 10, ("m1", "ok")), _row(4, 10, ("m1", "ok")),
            _row(5, 10, ("m1", "ok"))]
    times = {101: 20.0, 102: None, 103: 5.0, 104: None}  # 105 absent: never seen
    out = dr.draft_return(rows, times, edges=(0, 64))
    assert out["untimed"] == {"drafted": 2, "undrafted": 1}
    assert out["timed"] == 2
    assert out["baseline"]["annotations"] == 1 and out["baseline"]["median_s"] == 20.0
    m = out["models"]["m1"]
    assert (m["annotations"], m["untimed"], m["compared"]) == (3, 2, 1)
    assert m["saved_per_task_s"] == 15.0 and m["saved_total_s"] == 15.0


def test_a_bucket_without_undrafted_work_is_not_compared():
    rows = [_row(1, 10), _row(2, 10, ("m1", "ok")), _row(3, 500, ("m1", "ok"))]
    out = dr.draft_return(rows, {101: 30.0, 102: 10.0, 103: 99.0}, edges=(0, 64))
    m = out["models"]["m1"]
    assert (m["compared"], m["no_baseline"]) == (1, 1)
    assert m["saved_per_task_s"] == 20.0 and m["saved_total_s"] == 20.0


def test_no_undrafted_baseline_gives_no_saving_rather_than_a_guess():
    rows = [_row(1, 10, ("m1", "ok"))]
    out = dr.draft_return(rows, {101: 12.0})
    m = out["models"]["m1"]
    assert m["saved_per_task_s"] is None and m["saved_total_s"] is None
    assert m["no_baseline"] == 1 and out["saved_total_s"] is None


def test_per_model_against_everyone_and_per_annotator_against_their_own_work():
    """Model figures pool every annotator's undrafted work in the bucket; an annotator is
    compared with their own undrafted work (whose time did drafts save?). ``a`` writes from
    nothing in 30 s, ``b`` in 60 s; both take 20 s from a draft (m1 for a, m2 for b)."""
    rows = [_row(1, 10, annotator="a"), _row(2, 10, annotator="b"),
            _row(3, 10, ("m1", "ok"), annotator="a"), _row(4, 10, ("m2", "ok"), annotator="b"),
            _row(5, 10, ("m2", "ok"), annotator="c")]
    times = {101: 30.0, 102: 60.0, 103: 20.0, 104: 20.0, 105: 20.0}
    out = dr.draft_return(rows, times, edges=(0, 64))
    assert out["baseline"]["median_s"] == 45.0
    assert out["models"]["m1"]["saved_per_task_s"] == 25.0
    assert (out["models"]["m2"]["saved_per_task_s"], out["models"]["m2"]["saved_total_s"]) == (25.0, 50.0)
    a, b, c = (out["annotators"][k] for k in "abc")
    assert (a["saved_per_task_s"], a["baseline_annotations"]) == (10.0, 1)
    assert (b["saved_per_task_s"], b["baseline_annotations"]) == (40.0, 1)
    assert (c["saved_per_task_s"], c["no_baseline"], c["baseline_annotations"]) == (None, 1, 0)
    assert out["saved_total_s"] == 75.0


def test_acceptance_and_similarity_sit_beside_the_seconds():
    rows = [_row(1, 10), _row(2, 10, ("m1", "ok"), annotator="a")]
    accepted = {"m1": {"rows": 1, "accepted_unchanged": 1, "acceptance_rate": 1.0,
                       "mean_similarity": 1.0, "mean_similarity_edited": None}}
    out = dr.draft_return(rows, {101: 30.0, 102: 3.0}, models=accepted,
                          annotators={"a": {**accepted["m1"], "acceptance_rate": 0.5}})
    assert out["models"]["m1"]["acceptance_rate"] == 1.0
    assert out["models"]["m1"]["mean_similarity"] == 1.0
    assert out["annotators"]["a"]["acceptance_rate"] == 0.5


def test_the_card_section_and_table_show_seconds_saved_and_untimed_apart():
    rows = [_row(1, 10), _row(2, 10, ("m1", "ok")), _row(3, 10, ("m1", "ok"))]
    out = dr.draft_return(rows, {101: 30.0, 102: 10.0}, edges=(0, 64))
    text = "\n".join(formats.draft_return_section(out))
    assert "| `m1` | 2 | 1 | 1 | 10.0 | 30.0 | 20.0 | 20.0 |" in text
    assert "1 annotation(s) without lead_time" in text
    table = dr.return_table(out)
    assert table[0]["group"] == "model" and table[0]["name"] == "m1"
    assert table[0]["saved_per_task_s"] == 20.0


def test_a_drafts_section_with_figures_renders_the_return_too():
    rows = [_row(1, 10), _row(2, 10, ("m1", "ok"))]
    drafts = {"rows": 2, "drafted_rows": 1, "models": {},
              "return": dr.draft_return(rows, {101: 30.0, 102: 10.0})}
    assert any("Draft return" in line for line in formats.drafts_section(drafts))


def test_the_picture_is_a_png_with_or_without_figures():
    from sftflow.tasks.build.pictures import draft_return_png

    rows = [_row(1, 10), _row(2, 10, ("m1", "ok"), annotator="a")]
    for figures in (dr.draft_return(rows, {101: 30.0, 102: 10.0}), {}):
        assert draft_return_png(figures).startswith(b"\x89PNG")
