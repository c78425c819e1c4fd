"""Pure decisions of the finetune flow: the gates before submitting, and the eval gate after.

No I/O here: these functions take the dataset manifest or metrics and return what was decided
and why, so they are tested without services.
"""

from __future__ import annotations

from typing import Any

from sftflow.core.errors import SftflowError


def version_gates(manifest: dict[str, Any], *, backend: str, min_train_rows: int,
                  min_eval_rows: int) -> list[dict[str, Any]]:
    """The checks a version must pass before any job is submitted, each with its figures."""
    rows = manifest.get("rows") or {}
    files = manifest.get("files") or []
    train, evals = int(rows.get("train") or 0), int(rows.get("eval") or 0)

    def has(split: str, fmt: str) -> bool:
        return any(f.get("split") == split and f.get("format") == fmt for f in files)

    columns = _schema_columns(manifest.get("schema"))
    checks = [
        {"check": "train rows", "value": train, "need": f">= {min_train_rows}",
         "ok": train >= min_train_rows},
        {"check": "eval split rows", "value": evals, "need": f">= {min_eval_rows}",
         "ok": evals >= min_eval_rows},
        {"check": "train parquet", "value": has("train", "parquet"), "need": "present",
         "ok": has("train", "parquet")},
        {"check": "eval parquet", "value": has("eval", "parquet"), "need": "present",
         "ok": has("eval", "parquet") or min_eval_rows == 0},
        {"check": "prompt/completion columns",
         "value": "unknown" if columns is None else ",".join(sorted({"prompt", "completion"} & columns)),
         "need": "prompt,completion",
         "ok": columns is None or {"prompt", "completion"} <= columns},
    ]
    if backend == "openai":
        checks.append({"check": "openai_chat train file", "value": has("train", "openai_chat"),
                       "need": "present", "ok": has("train", "openai_chat")})
    return checks


def _schema_columns(schema: Any) -> set[str] | None:
    """Column names from the manifest's schema, whatever shape it has; None if not stated."""
    if isinstance(schema, dict):
        if isinstance(schema.get("fields"), list):
            return {str(f.get("name")) for f in schema["fields"] if isinstance(f, dict)}
        if isinstance(schema.get("columns"), (list, dict)):
            return {str(c if isinstance(c, str) else c.get("name")) for c in schema["columns"]}
        return set(schema) or None
    if isinstance(schema, list):
        return {str(c if isinstance(c, str) else c.get("name")) for c in schema}
    return None


def require_gates(checks: list[dict[str, Any]], where: str) -> None:
    failed = [c for c in checks if not c["ok"]]
    if failed:
        what = "; ".join(f"{c['check']} is {c['value']} (need {c['need']})" for c in failed)
        raise SftflowError(f"{where} fails the fine-tune gates: {what}")


def eval_gate(metrics: dict[str, Any], baseline_job: str | None) -> dict[str, Any]:
    """Whether the new model beats the dataset's current best on this version's eval split.

    Both losses come from the same eval rows and the same loss (completion tokens only), so
    they compare directly when the two models share a tokenizer (the same base model family).
    """
    new = metrics.get("eval_loss")
    if new is None:
        return {"decision": "skipped", "reason": "no eval loss", "promote": False}
    if baseline_job is None:
        return {"decision": "best", "reason": "first model of this dataset", "eval_loss": new,
                "promote": True}
    old = metrics.get("baseline_eval_loss")
    if old is None:
        return {"decision": "skipped", "reason": f"baseline {baseline_job} was not evaluated",
                "eval_loss": new, "baseline_job": baseline_job, "promote": False}
    better = new < old
    return {
        "decision": "best" if better else "not better",
        "reason": f"eval loss {new:.4f} {'<' if better else '>='} {old:.4f} of {baseline_job}",
        "eval_loss": new, "baseline_job": baseline_job, "baseline_eval_loss": old,
        "delta": new - old, "promote": better,
    }
