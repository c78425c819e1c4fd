"""Threshold arithmetic on Label Studio project counters, and the polling schedule."""

from __future__ import annotations

import random

import pytest

from sftflow.core.errors import ConfigError
from sftflow.tasks.runtime.polling import Backoff
from sftflow.tasks.triggers.counters import ProjectCounters, Threshold, counter_field, progress

PROJECT = {"id": 7, "title": "p", "task_number": 100, "num_tasks_with_annotations": 40,
           "total_annotations_number": 55, "finished_task_number": 12,
           "skipped_annotations_number": 3, "maximum_annotations": 2}


def test_counters_from_webhook_project_dict():
    c = ProjectCounters.from_project(PROJECT)
    assert (c.project_id, c.num_tasks_with_annotations, c.total_annotations_number) == (7, 40, 55)
    with pytest.raises(ValueError):
        ProjectCounters.from_project({"title": "no id"})


def test_counter_field_per_mode():
    assert counter_field(Threshold(min_new=1), 1) == "num_tasks_with_annotations"
    assert counter_field(Threshold(min_new=1, count="annotations"), 1) == "total_annotations_number"
    assert counter_field(Threshold(min_new=1, min_annotations_per_task=2), 2) == "finished_task_number"
    with pytest.raises(ConfigError, match="overlap"):
        counter_field(Threshold(min_new=1, min_annotations_per_task=3), 2)


def test_progress_counts_since_the_baseline_of_the_same_project():
    c = ProjectCounters.from_project(PROJECT)
    p = progress(c, Threshold(min_new=50), None)
    assert (p.new, p.reached, p.describe()) == (40, False, "not enough annotations yet: 40 of 50")
    assert p.fraction == pytest.approx(0.8)
    base = {"project_id": 7, "num_tasks_with_annotations": 10, "total_annotations_number": 10}
    p = progress(c, Threshold(min_new=30), base)
    assert (p.baseline, p.new, p.reached) == (10, 30, True)
    p = progress(c, Threshold(min_new=45, count="annotations"), base)
    assert (p.new, p.reached) == (45, True)
    # A version built from another project is no baseline for this one.
    p = progress(c, Threshold(min_new=30), {**base, "project_id": 8})
    assert p.baseline == 0 and p.new == 40


def test_backoff_stays_between_bounds_and_grows():
    b = Backoff(1.0, 8.0, rng=random.Random(0))
    delays = [b.next_delay(progressed=False) for _ in range(8)]
    assert all(1.0 <= d <= 8.0 for d in delays)
    assert delays[-1] > 6.0 and delays[0] < 1.3  # grew from ~1 s to the ~8 s cap
    assert b.next_delay(progressed=True) < 1.3  # progress resets to the minimum


def test_backoff_poll_budget_is_about_60_an_hour_at_60_s():
    assert Backoff(60, 600).max_polls(3600) == 62
    with pytest.raises(ValueError):
        Backoff(0, 1)


class _Projects:
    def __init__(self, result):
        self.result = result
        self.calls = 0

    def get(self, id: int):
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_watch_counts_failed_polls_until_the_deadline():
    from types import SimpleNamespace

    from sftflow.tasks.triggers.counters import watch_progress

    client = SimpleNamespace(projects=_Projects(RuntimeError("down")))
    watch = watch_progress(client, "7", Threshold(min_new=1), None, timeout_s=0.3,
                           backoff=Backoff(0.05, 0.1))
    assert not watch.reached and watch.progress is None
    assert watch.polls == watch.failed_polls == client.projects.calls >= 2
    assert watch.last_error == "RuntimeError: down" and 0.3 <= watch.waited_s < 2


def test_watch_stops_at_the_first_poll_that_reaches_the_threshold():
    from types import SimpleNamespace

    from sftflow.tasks.triggers.counters import watch_progress

    seen = []
    client = SimpleNamespace(projects=_Projects(SimpleNamespace(**PROJECT)))
    watch = watch_progress(client, "7", Threshold(min_new=30),
                           {"project_id": 7, "num_tasks_with_annotations": 10}, timeout_s=60,
                           backoff=Backoff(5, 10), on_progress=seen.append)
    assert watch.reached and watch.polls == 1 and watch.progress.new == 30
    assert [p.new for p in seen] == [30]
