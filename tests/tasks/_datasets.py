"""Test helpers for dataset builds: synthetic final rows, and Label Studio projects whose
tasks carry annotations (imported with the tasks, as an annotator's work would be)."""

from __future__ import annotations

from typing import Any

from sftflow.tasks.versions import formats
from sftflow.tasks.versions.rows import SftRow


def exported_row(i: int, prompt: str, completion: str, *, pid: str | None = None,
                 updated_at: str = "2026-01-01T00:00:00Z", gt: bool = False) -> dict:
    """One row as the export makes it (task ``i``, annotation ``1000 + i``), before the split."""
    return {"prompt": prompt, "completion": completion, "prompt_id": pid or f"p{i}",
            "task_id": i, "annotation_id": 1000 + i, "annotator": "1", "updated_at": updated_at,
            "ground_truth": gt, "draft_model": None, "draft_similarity": None,
            "draft_unchanged": None}


def final_rows(n: int, start: int = 0, eval_every: int = 10, tag: str = "") -> list[SftRow]:
    """``n`` rows with every stored column, ids ``start..start+n-1`` (distinct content)."""
    rows: list[SftRow] = []
    for i in range(start, start + n):
        row: SftRow = {
            "prompt": f"Prompt {i}{tag}: explain item {i} in a sentence.",
            "completion": f"Item {i}{tag} is explained here with a sentence of moderate length.",
            "prompt_id": f"{i:032x}",
            "task_id": i,
            "annotation_id": 100_000 + i,
            "annotator": "1",
            "updated_at": "2026-01-01T00:00:00Z",
            "ground_truth": False,
            "draft_model": None, "draft_similarity": None, "draft_unchanged": None,
            "cluster_id": f"{i:016x}",
            "split": "eval" if i % eval_every == 0 else "train",
        }
        row["row_hash"] = formats.row_hash(row)
        rows.append(row)
    return rows


def textarea(text: Any, *, from_name: str = "instruction", type_: str = "textarea") -> dict:
    return {"from_name": from_name, "to_name": "prompt", "type": type_, "value": {"text": text}}


def annotation(text: Any, *, cancelled: bool = False, ground_truth: bool = False,
               result: list | None = None) -> dict[str, Any]:
    return {
        "result": result if result is not None else [textarea([text])],
        "was_cancelled": cancelled,
        "ground_truth": ground_truth,
    }


def make_project(labelstudio, title: str, tasks: list[dict[str, Any]]) -> Any:
    """A project with the SFT labeling config, holding ``tasks`` (with their annotations).

    Batches of 1,000: Label Studio 1.23 imported 3,000 tasks in one request without their
    annotations (task_count 3000, annotation_count 0); 1,000 kept them."""
    from sftflow.tasks.ingest.projects import ensure_project

    project = ensure_project(labelstudio, title)
    for i in range(0, len(tasks), 1000):
        labelstudio.projects.import_tasks(id=project.id, request=tasks[i:i + 1000],
                                          return_task_ids=False)
    return project
