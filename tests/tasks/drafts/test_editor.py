"""The annotator's screen, in a real browser (issue #20): Label Studio's editor in headless
Chromium, on a project sftflow created and drafted.

A person logs in, opens a drafted task, sees the draft pre-filled and readable, edits it in
place and submits; submits the next draft unchanged; writes a third answer with no draft. The
next build attributes both drafted annotations to the drafting model (one accepted unchanged,
one edited) with the lead times the editor measured, and compares them with the undrafted one.

Seen failing before its fix: with Label Studio's template as shipped (white response text), the
pre-filled draft was white on an off-white box, contrast 1.06 (``test_the_draft_is_pre_filled``
below asserts at least 4.5, WCAG's figure for text); and without ``editable`` the draft had
only a delete button, so an edit meant retyping it. (Label Studio 1.23's task view pre-fills a
task's prediction even when the project selects no model version or turns
``show_collab_predictions`` off: both tried, the drafts still showed.)
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from sftflow.flows.build_dataset import BuildParams, build_dataset
from sftflow.tasks.drafts.stage import select_drafts, write_draft
from sftflow.tasks.ingest.projects import ensure_project
from sftflow.tasks.runtime.polling import Backoff, wait_until
from sftflow.tasks.versions.read import load_manifest
from tests._browser import (
    chromium,
    contrast_ratio,
    log_in,
    screenshots_on_failure,
    visible,
    wait_for,
)
from tests.conftest import unique

pytestmark = pytest.mark.integration

MODEL = "ft-editor-model"
PAGE_S = 90  # a task page, on a loaded 2-core machine (about 6 s when quiet)
PROMPTS = {"edit": "What is a kettle for?", "accept": "What is a lamp for?",
           "scratch": "What is a broom for?"}
DRAFTS = {"edit": "A kettle boils water.", "accept": "A lamp gives light."}
EDITED = "A kettle boils water for tea."
SCRATCH = "A broom sweeps the floor."
REGION = "[data-testid=htx-textbox-content]"


def _button(driver: Any, label: str) -> None:
    """Click the displayed button whose text is ``label`` (found afresh: the page re-renders)."""
    from selenium.webdriver.common.by import By

    def find(d: Any) -> Any:
        found = [b for b in d.find_elements(By.CSS_SELECTOR, "button")
                 if b.is_displayed() and b.text.strip() == label]
        return found[0] if found else None

    wait_for(driver, find, 30, f"the {label} button").click()


def _edit_box() -> Any:
    """A condition: the draft's text box once Edit has opened it. Edit is clicked, and clicked
    again when no box came 3 s later: on CI a click landed while the task view was still
    re-rendering and was lost."""
    last = [float("-inf")]

    def opened(driver: Any) -> Any:
        boxes = visible(".answer-input textarea")(driver)
        if boxes:
            return boxes[0]
        regions = visible(REGION)(driver)
        if regions and time.monotonic() - last[0] > 3.0:
            from selenium.webdriver.common.action_chains import ActionChains
            from selenium.webdriver.common.by import By

            # the region's buttons show on hover, as for a person's mouse
            ActionChains(driver).move_to_element(regions[0]).perform()
            driver.find_element(By.CSS_SELECTOR, "[data-testid=htx-textbox-edit-button]").click()
            last[0] = time.monotonic()
        return None

    return opened


def _type(driver: Any, css: str, text: str) -> None:
    """Type ``text`` into the text box ``css`` until it holds it: a box the editor re-renders
    while the task loads comes back empty (seen on CI: the typed answer was gone)."""
    def typed(d: Any) -> bool:
        boxes = visible(css)(d)
        if not boxes:
            return False
        if boxes[0].get_attribute("value") == text:
            return True
        boxes[0].clear()
        boxes[0].send_keys(text)
        return False  # read it back on the next poll

    wait_for(driver, typed, 30, f"{text!r} typed into {css}")


def _submit(driver: Any) -> None:
    _button(driver, "Submit")


def _open(driver: Any, base: str, project_id: int, task_id: int) -> None:
    driver.get(f"{base}/projects/{project_id}/data?tab=0&task={task_id}")
    wait_for(driver, visible("[data-testid=textarea-control]"), PAGE_S, f"the editor of task {task_id}")


def _annotation(labelstudio, task_id: int) -> Any:
    """The task's one annotation, once the editor's submit has reached the server."""
    found = wait_until(lambda: next(iter(labelstudio.annotations.list(id=task_id)), None),
                       timeout_s=60, backoff=Backoff(0.3, 2.0))
    assert found is not None, f"the editor's submit of task {task_id} stored no annotation in 60 s"
    return found


def _text(annotation: Any) -> str:
    return "".join(annotation.result[0]["value"]["text"])


def _draft_shown(driver: Any, task_id: int) -> str:
    """The pre-filled draft's text, once shown, and readable (dark on light, as a person sees)."""
    wait_for(driver, visible(REGION), PAGE_S, f"the draft pre-filled in task {task_id}")
    text, colour, background = wait_for(driver, lambda d: d.execute_script(
        "const e = document.querySelector(arguments[0]); if (!e) return null;"
        "const p = e.querySelector('p') || e;"
        "return [e.innerText, getComputedStyle(p).color, getComputedStyle(e).backgroundColor];",
        REGION), 30, f"the draft's text in task {task_id}")
    ratio = contrast_ratio(colour, background)
    assert ratio >= 4.5, f"the draft is hard to read: {colour} on {background}, contrast {ratio:.2f}"
    return text.strip()


def _annotate_in_browser(driver: Any, base: str, project_id: int, tasks: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    # 1. the draft, edited in place: the region's edit button turns it into a text box
    _open(driver, base, project_id, tasks["edit"].id)
    assert _draft_shown(driver, tasks["edit"].id) == DRAFTS["edit"]
    box = wait_for(driver, _edit_box(), 30, "the draft's text box after Edit")
    assert box.get_attribute("value") == DRAFTS["edit"]
    _type(driver, ".answer-input textarea", EDITED)
    _submit(driver)
    # 2. the draft, submitted as it is
    _open(driver, base, project_id, tasks["accept"].id)
    assert _draft_shown(driver, tasks["accept"].id) == DRAFTS["accept"]
    _submit(driver)
    # 3. no draft: the empty text box, typed from scratch
    _open(driver, base, project_id, tasks["scratch"].id)
    assert not driver.find_elements(By.CSS_SELECTOR, REGION), "an undrafted task shows a draft"
    _type(driver, ".answer-input textarea", SCRATCH)
    _button(driver, "Add")  # the typed answer becomes the response (a region), as Shift+Enter does
    wait_for(driver, visible(REGION), 30, "the typed answer added")
    _submit(driver)


def test_the_draft_is_pre_filled_edited_in_place_and_attributed_with_lead_times(
        prefect_harness, stack, s3, labelstudio):
    project = ensure_project(labelstudio, unique("t-editor"))
    try:
        labelstudio.projects.import_tasks(id=project.id, request=[{"prompt": p} for p in PROMPTS.values()])
        by_prompt = {t.data["prompt"]: t for t in labelstudio.tasks.list(project=project.id)}
        tasks = {kind: by_prompt[prompt] for kind, prompt in PROMPTS.items()}
        for kind, text in DRAFTS.items():
            assert write_draft(labelstudio, tasks[kind].id, text, MODEL)
        select_drafts(labelstudio, project.id, MODEL)

        driver = chromium()
        try:
            with screenshots_on_failure(driver, "editor-drafts"):
                log_in(driver, stack.labelstudio.url, stack.stack.label_studio_user,
                       stack.stack.label_studio_password.get_secret_value())
                _annotate_in_browser(driver, stack.labelstudio.url, project.id, tasks)
                made = {kind: _annotation(labelstudio, t.id) for kind, t in tasks.items()}
        finally:
            driver.quit()

        # what the editor stored: the draft each started from, and the seconds spent
        drafts = {p.task: p.id for p in labelstudio.predictions.list(project=project.id)}
        assert _text(made["edit"]).strip() == EDITED and _text(made["accept"]) == DRAFTS["accept"]
        assert _text(made["scratch"]).strip() == SCRATCH
        for kind in DRAFTS:
            assert made[kind].parent_prediction == drafts[tasks[kind].id]
        assert made["scratch"].parent_prediction is None
        assert all(a.lead_time and a.lead_time > 0 for a in made.values())

        report = build_dataset(BuildParams(project=str(project.id), dataset="editor",
                                           bucket=s3.bucket, draft_policy="include"))
    finally:
        labelstudio.projects.delete(id=project.id)

    stats = load_manifest(s3, "editor", report.version).stats["drafts"]
    model = stats["models"][MODEL]
    assert (model["rows"], model["accepted_unchanged"], model["acceptance_rate"]) == (2, 1, 0.5)
    assert 0 < model["mean_similarity_edited"] < 1
    saved = stats["return"]["models"][MODEL]
    # both drafted annotations timed by the editor, compared with the undrafted one
    assert (saved["annotations"], saved["untimed"], saved["compared"]) == (2, 0, 2)
    assert saved["median_with_draft_s"] > 0 and saved["median_without_draft_s"] > 0
    assert stats["return"]["baseline"]["annotations"] == 1
