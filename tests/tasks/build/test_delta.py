"""Finding deleted tasks by counting id ranges: the pure bisection, then on the real Label
Studio server."""

from __future__ import annotations

import math
import random

import pytest

from sftflow.tasks.build.delta import find_deleted, find_missing
from sftflow.tasks.ingest.projects import SFT_LABEL_CONFIG
from tests.conftest import unique


def counter(present: set[int]):
    return lambda lo, hi: sum(1 for i in present if lo <= i < hi)


@pytest.mark.parametrize("seed", range(20))
def test_the_missing_ids_are_found_exactly_with_about_log2_counts_each(seed):
    rng = random.Random(seed)
    expected = rng.sample(range(1, 200_000), 5000)
    gone = set(rng.sample(expected, rng.choice([1, 2, 5, 40])))
    found, counts = find_missing(expected, counter(set(expected) - gone))
    assert found == gone
    # one count for the whole range, then about one per halving for each missing id
    assert counts <= 1 + len(gone) * math.ceil(math.log2(len(expected))), counts
    if len(gone) == 1:
        assert counts <= 2 + math.ceil(math.log2(len(expected)))


def test_nothing_missing_costs_one_count_and_an_unnamed_task_gives_up():
    expected = list(range(10, 1000, 3))
    assert find_missing(expected, counter(set(expected))) == (set(), 1)
    # a task the change list did not name sits in the range: no answer, not a wrong one
    extra = set(expected) - {13} | {14, 15}
    assert find_missing(expected, counter(extra))[0] is None
    # a run of deletions is found without a count per id
    found, counts = find_missing(expected, counter(set(expected) - set(expected[100:200])))
    assert found == set(expected[100:200]) and counts < 100


def lister(present: set[int]):
    return lambda lo, hi: {i for i in present if lo <= i < hi}


@pytest.mark.parametrize("seed", range(10))
def test_short_ranges_are_listed_instead_of_bisected_down_to_one_id(seed):
    rng = random.Random(seed)
    expected = rng.sample(range(1, 200_000), 55_000)
    gone = set(rng.sample(expected, rng.choice([1, 2, 5])))
    present = set(expected) - gone
    bisected, counts = find_missing(expected, counter(present))
    found, requests = find_missing(expected, counter(present), listing=lister(present),
                                   list_below=512)
    assert found == bisected == gone
    # down to 512 ids, then one listing: 7 halvings of 55k fewer per missing id
    assert requests <= counts - 7 * len(gone) + len(gone), (requests, counts)


def test_a_listing_that_disagrees_with_its_count_is_no_answer():
    expected = list(range(0, 3000, 3))
    present = set(expected) - {30}
    assert find_missing(expected, counter(present), listing=lambda lo, hi: None)[0] is None
    unnamed = lambda lo, hi: lister(present)(lo, hi) | ({31} if lo <= 31 < hi else set())
    assert find_missing(expected, counter(present), listing=unnamed)[0] is None
    moved = lambda lo, hi: lister(present - {33})(lo, hi)  # another task went meanwhile
    assert find_missing(expected, counter(present), listing=moved)[0] is None
    assert find_missing(expected, counter(present), listing=lister(present))[0] == {30}


def test_the_request_budget_is_kept():
    expected = list(range(1000))
    found, counts = find_missing(expected, counter(set(range(0, 1000, 2))), max_requests=30)
    assert found is None and counts == 30


@pytest.mark.integration
def test_deleted_tasks_are_named_on_the_real_server(labelstudio):
    project = labelstudio.projects.create(title=unique("t-delta"), label_config=SFT_LABEL_CONFIG)
    try:
        ids = labelstudio.projects.import_tasks(
            id=project.id, request=[{"prompt": f"question {i}?"} for i in range(300)],
            return_task_ids=True).task_ids
        gone = {ids[0], ids[150], ids[151], ids[-1]}
        for task_id in gone:
            labelstudio.tasks.delete(id=task_id)
        assert find_deleted(labelstudio, project.id, ids) == gone
        assert find_deleted(labelstudio, project.id, [i for i in ids if i not in gone]) == set()
        # a task left out of the list but still in the project: no answer, not a wrong one
        unnamed = [i for i in ids if i not in gone and i != ids[50]]
        assert find_deleted(labelstudio, project.id, unnamed) is None
    finally:
        labelstudio.projects.delete(id=project.id)
