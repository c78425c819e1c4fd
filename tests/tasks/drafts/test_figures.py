"""tasks.drafts.figures: acceptance per drafting model, annotator agreement and outliers, the
training policy for drafts accepted unchanged, and their rendering (figures checked by hand).
The last test runs the real export snapshot of a real Label Studio project."""

from __future__ import annotations

import pytest
import yaml

from sftflow.tasks.build import filters
from sftflow.tasks.build.edits import draft_fields
from sftflow.tasks.drafts import figures
from sftflow.tasks.versions import formats


def _row(i: int, completion: str, draft: tuple[str, str | None] | None = None,
         annotator: str = "1") -> dict:
    return {"prompt": f"prompt {i}", "completion": completion, "prompt_id": f"p{i}",
            "task_id": i, "annotation_id": 100 + i, "annotator": annotator,
            "updated_at": "2026-01-01T00:00:00Z", "ground_truth": False,
            **draft_fields(draft, completion)}


def _rows() -> list[dict]:
    return [
        _row(1, "Paris.", ("job-a", "Paris.")),  # accepted unchanged: 1.0
        _row(2, "abce", ("job-a", "abcd")),  # 1 substitution of 4: 0.75
        _row(3, "sitting", ("job-a", "kitten")),  # distance 3 of 7: 4/7
        _row(4, "yes", ("job-b", "yes")),
        _row(5, "no", ("job-b", "no")),
        _row(6, "text", ("job-c", None)),  # the draft had no response text
        _row(7, "written from nothing"),
    ]


def test_acceptance_rate_and_similarity_per_model():
    m = figures.model_figures(_rows())
    assert list(m) == ["job-a", "job-b", "job-c"]
    assert m["job-a"] == {
        "rows": 3, "compared": 3, "accepted_unchanged": 1,
        "acceptance_rate": 0.3333,  # 1 of 3
        "mean_similarity": 0.7738,  # (1 + 0.75 + 0.5714) / 3
        "median_similarity": 0.75,
        "mean_similarity_edited": 0.6607,  # (0.75 + 0.5714) / 2
    }
    assert m["job-b"] == {"rows": 2, "compared": 2, "accepted_unchanged": 2,
                          "acceptance_rate": 1.0, "mean_similarity": 1.0,
                          "median_similarity": 1.0, "mean_similarity_edited": None}
    assert m["job-c"] == {"rows": 1, "compared": 0, "accepted_unchanged": 0,
                          "acceptance_rate": None, "mean_similarity": None,
                          "median_similarity": None, "mean_similarity_edited": None}


# Four annotators on three tasks; x disagrees with everyone (similarities set by hand).
AGREEMENT = {
    1: [("a", "b", 0.9), ("a", "x", 0.2), ("b", "x", 0.3)],
    2: [("a", "c", 0.8), ("a", "x", 0.1), ("c", "x", 0.3)],
    3: [("b", "c", 1.0), ("b", "x", 0.2), ("c", "x", 0.2)],
}


def test_agreement_overall_per_annotator_and_the_outlier_flagged():
    ag = figures.annotator_agreement(AGREEMENT)
    assert (ag["tasks"], ag["pairs"]) == (3, 9)
    assert ag["mean_similarity"] == pytest.approx(4.0 / 9, abs=1e-4)
    means = {a: f["mean_similarity"] for a, f in ag["annotators"].items()}
    # a: (.9+.2+.8+.1)/4, b: (.9+.3+1+.2)/4, c: (.8+.3+1+.2)/4, x: (.2+.3+.1+.3+.2+.2)/6
    assert means == {"a": 0.5, "b": 0.6, "c": 0.575, "x": 0.2167}
    z = {a: f["robust_z"] for a, f in ag["annotators"].items()}
    # x against a, b, c: median .575, MAD .025 -> 1.4826 MAD = .037 < floor .05:
    # (.2167 - .575) / .05 = -7.17
    assert z["x"] == pytest.approx(-7.1667, abs=1e-3)
    # a against b, c, x: median .575, MAD .025 -> floor .05: (.5 - .575) / .05 = -1.5
    assert z["a"] == pytest.approx(-1.5, abs=1e-3)
    # b against a, c, x: median .5, MAD .075: .1 / (1.4826 * .075) = .899
    assert z["b"] == pytest.approx(0.8993, abs=1e-3)
    assert ag["flagged"] == ["x"]
    assert ag["annotators"]["x"] == {"pairs": 6, "tasks": 3, "mean_similarity": 0.2167,
                                     "robust_z": pytest.approx(-7.1667, abs=1e-3),
                                     "flagged": True}
    assert ag["lowest_pairs"][:2] == [
        {"task_id": 2, "annotators": ["a", "x"], "similarity": 0.1},
        {"task_id": 1, "annotators": ["a", "x"], "similarity": 0.2}]


def test_no_one_is_flagged_without_enough_pairs_or_others_to_compare_with():
    two = {1: [("a", "b", 0.1)], 2: [("a", "b", 0.2)], 3: [("a", "b", 0.3)]}
    ag = figures.annotator_agreement(two)
    assert ag["flagged"] == [] and ag["annotators"]["a"]["robust_z"] is None
    assert figures.annotator_agreement(AGREEMENT, min_pairs=5)["flagged"] == []  # only x has 6
    empty = figures.annotator_agreement({})
    assert (empty["pairs"], empty["mean_similarity"], empty["flagged"]) == (0, None, [])


def test_draft_figures_for_the_manifest_and_their_rendering():
    rows = _rows()
    stats = figures.draft_figures(rows, AGREEMENT)
    assert (stats["rows"], stats["drafted_rows"], stats["policy"], stats["excluded"]) == (
        7, 6, "exclude", 3)
    assert "own" in stats["policy_reason"] and stats["models"]["job-b"]["acceptance_rate"] == 1.0
    assert stats["agreement"]["flagged"] == ["x"]
    assert figures.draft_figures(rows, {}, "include")["excluded"] == 0
    assert figures.figures_table(stats)[0] == {
        "model": "job-a", "rows": 3, "accepted_unchanged": 1, "acceptance_rate": 0.3333,
        "mean_similarity": 0.7738, "mean_similarity_edited": 0.6607}
    md = figures.figures_markdown(stats)
    assert "| `job-a` | 3 | 1 | 0.333 | 0.774 | 0.661 |" in md
    assert "| x | 6 | 0.217 | -7.167 | **yes** |" in md
    assert "- task 2: a / x, similarity 0.100" in md

    card = formats.dataset_card(dataset="d", version="v1", rows={"train": 6}, sizes={},
                                stats={"drafts": stats}, source={}, config={})
    assert "## Model drafts" in card and "| `job-b` | 2 | 2 | 1.000 | 1.000 |  |" in card
    assert "Flagged for review: x" in card
    front = yaml.safe_load(card.split("---")[1])
    dtypes = {f["name"]: f["dtype"] for f in front["dataset_info"]["features"]}
    assert dtypes["draft_similarity"] == "float64" and dtypes["draft_unchanged"] == "bool"
    plain = formats.dataset_card(dataset="d", version="v1", rows={"train": 6}, sizes={},
                                 stats={}, source={}, config={})
    assert "## Model drafts" not in plain


# -- on the real Label Studio ------------------------------------------------------------------
def _annotator(ls, n: int) -> int:
    """A second Label Studio user (annotations are made as them through ``completed_by``),
    created once and reused: users are not deleted with projects."""
    email = f"annotator-{n}@sftflow.local"
    found = [u for u in ls.users.list() if u.email == email]
    return int((found[0] if found else ls.users.create(username=f"annotator-{n}",
                                                      email=email)).id)


@pytest.mark.integration
def test_figures_from_a_real_export_snapshot(labelstudio, tmp_path):
    """Two models' drafts on four tasks: two accepted unchanged (through ``parent_prediction``,
    as the editor records it), one edited, one written from nothing, and one task answered by
    two annotators; the snapshot is created, downloaded and parsed by the build's own code."""
    from sftflow.tasks.build.export import (
        create_snapshot,
        delete_snapshot,
        download_snapshot,
        parse_export_file,
    )
    from sftflow.tasks.drafts.stage import draft_result
    from sftflow.tasks.ingest.projects import ensure_project
    from tests.conftest import unique

    ls = labelstudio
    second = _annotator(ls, 1)
    project = ensure_project(ls, unique("figures"))
    try:
        ls.projects.import_tasks(id=project.id, request=[{"prompt": f"Question {i}?"}
                                                         for i in range(5)])
        t = [task.id for task in sorted(ls.tasks.list(project=project.id), key=lambda x: x.id)]

        def draft(task: int, model: str, text: str) -> int:
            return ls.predictions.create(task=task, result=draft_result(text),
                                         model_version=model).id

        def answer(task: int, text: str, parent: int | None = None, **kw) -> None:
            ls.annotations.create(id=task, result=draft_result(text), parent_prediction=parent,
                                  **kw)

        answer(t[0], "Paris.", draft(t[0], "job-a", "Paris."))  # accepted unchanged
        answer(t[1], "abce", draft(t[1], "job-a", "abcd"))  # edited: 0.75
        answer(t[2], "yes", draft(t[2], "job-b", "yes"))  # accepted unchanged
        draft(t[3], "job-b", "a draft nobody used")
        answer(t[3], "written from nothing")  # no parent_prediction: no draft seen
        answer(t[4], "abcd")  # two annotators on one task: similarity 0.75
        answer(t[4], "abce", completed_by=second)

        snap = create_snapshot(ls, project.id, timeout_s=120)
        try:
            path = download_snapshot(ls, snap, tmp_path / "export.json")
        finally:
            delete_snapshot(ls, snap)
        parsed = parse_export_file(path, "all")
    finally:
        ls.projects.delete(id=project.id)

    stats = figures.draft_figures(parsed.rows, parsed.agreement)
    assert (stats["rows"], stats["drafted_rows"], stats["excluded"]) == (6, 3, 2)
    assert stats["models"]["job-a"] == {
        "rows": 2, "compared": 2, "accepted_unchanged": 1, "acceptance_rate": 0.5,
        "mean_similarity": 0.875, "median_similarity": 0.875, "mean_similarity_edited": 0.75}
    assert stats["models"]["job-b"]["acceptance_rate"] == 1.0
    assert stats["models"]["job-b"]["rows"] == 1  # the unused draft is not counted
    ag = stats["agreement"]
    assert (ag["tasks"], ag["pairs"], ag["mean_similarity"]) == (1, 1, 0.75)
    assert set(ag["annotators"]) == {"1", str(second)}
    assert parsed.counts["rows_with_model_draft"] == 3
    kept, excluded = filters.apply_draft_policy(parsed.rows)
    assert len(kept) == 4 and {e["task_id"] for e in excluded} == {t[0], t[2]}
