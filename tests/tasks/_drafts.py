"""Test helpers for drafting: a real Label Studio SFT project with open, annotated and skipped
tasks, and the predictions it holds."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest

from sftflow.tasks.drafts.stage import draft_result
from sftflow.tasks.ingest.projects import ensure_project
from tests.conftest import unique


@dataclass
class SftProject:
    id: int
    title: str
    tasks: dict[str, int] = field(default_factory=dict)  # prompt -> task id
    annotated: set[int] = field(default_factory=set)
    skipped: set[int] = field(default_factory=set)  # only a cancelled annotation: still open

    @property
    def open(self) -> set[int]:
        return set(self.tasks.values()) - self.annotated


def make_project(ls, prompts: list[str], *, annotate: int = 0, skip: int = 0) -> SftProject:
    """A new SFT project with one task per prompt; the first ``annotate`` tasks get an
    annotation, the next ``skip`` a cancelled one."""
    created = ensure_project(ls, unique("drafts"))
    ls.projects.import_tasks(id=created.id, request=[{"prompt": p, "prompt_id": f"p{i}"}
                                                     for i, p in enumerate(prompts)])
    listed = sorted(ls.tasks.list(project=created.id, fields="all"), key=lambda t: t.id)
    project = SftProject(created.id, created.title, {t.data["prompt"]: t.id for t in listed})
    for n, task in enumerate(listed[:annotate + skip]):
        cancelled = n >= annotate
        ls.annotations.create(id=task.id, result=[] if cancelled else draft_result("by a human"),
                              was_cancelled=cancelled)
        (project.skipped if cancelled else project.annotated).add(task.id)
    return project


def predictions(ls, project_id: int) -> Counter[tuple[int, str]]:
    """(task id, model_version) -> how many predictions."""
    return Counter((p.task, p.model_version) for p in ls.predictions.list(project=project_id))


def texts(ls, project_id: int, model_version: str) -> dict[int, str]:
    return {p.task: p.result[0]["value"]["text"][0] for p in ls.predictions.list(project=project_id)
            if p.model_version == model_version}


@pytest.fixture()
def sft_project(labelstudio):
    """``make(prompts, annotate=, skip=)``; every project made is deleted afterwards."""
    made: list[int] = []

    def make(prompts: list[str], **kw) -> SftProject:
        project = make_project(labelstudio, prompts, **kw)
        made.append(project.id)
        return project

    yield make
    for pid in made:
        labelstudio.projects.delete(id=pid)
