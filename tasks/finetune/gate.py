"""Decisions of the finetune flow: the gates before submitting, and the eval gate after.

The decisions are pure: they take the version's figures (:class:`TrainingData`) or the job's
metrics and return what was decided and why, so they are tested without services.
:data:`check_gates` is the task the flow runs: it publishes the gates as a table artifact and
fails when one does not pass.
"""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_table_artifact

from sftflow.core.errors import SftflowError
from sftflow.tasks.finetune.dataset import TrainingData
from sftflow.tasks.runtime.declare import compute_task


def version_gates(data: TrainingData, *, backend: str, min_train_rows: int,
                  min_eval_rows: int) -> list[dict[str, Any]]:
    """The checks a version must pass before any job is submitted, each with its figures."""
    train, evals = data.rows.get("train", 0), data.rows.get("eval", 0)
    columns = None if data.columns is None else set(data.columns)
    checks = [
        {"check": "train rows", "value": train, "need": f">= {min_train_rows}",
         "ok": train >= min_train_rows},
        {"check": "eval split rows", "value": evals, "need": f">= {min_eval_rows}",
         "ok": evals >= min_eval_rows},
        {"check": "train parquet", "value": data.has("train", "parquet"), "need": "present",
         "ok": data.has("train", "parquet")},
        {"check": "eval parquet", "value": data.has("eval", "parquet"), "need": "present",
         "ok": data.has("eval", "parquet") or min_eval_rows == 0},
        {"check": "prompt/completion columns",
         "value": "unknown" if columns is None else ",".join(sorted({"prompt", "completion"} & columns)),
         "need": "prompt,completion",
         "ok": columns is None or {"prompt", "completion"} <= columns},
    ]
    if backend == "openai":
        checks.append({"check": "openai_chat train file", "value": data.has("train", "openai_chat"),
                       "need": "present", "ok": data.has("train", "openai_chat")})
    return checks


def require_gates(checks: list[dict[str, Any]], where: str) -> None:
    failed = [c for c in checks if not c["ok"]]
    if failed:
        what = "; ".join(f"{c['check']} is {c['value']} (need {c['need']})" for c in failed)
        raise SftflowError(f"{where} fails the fine-tune gates: {what}")


def eval_gate(metrics: dict[str, Any], baseline_job: str | None,
              few_shot: dict[str, Any] | None = None) -> dict[str, Any]:
    """Whether the new model beats both the dataset's current best and the few-shot baseline
    (the base model with ``k`` train rows in its prompt) on this version's eval split.

    All three losses come from the same eval rows and the same loss (completion tokens only),
    so they compare directly when the models share a tokenizer (the same base model family).
    ``few_shot`` is the job's ``few_shot.FewShotResult`` (a dict), None when none was asked for
    (k = 0, or a backend without one): then the previous best alone decides. A baseline that
    was asked for and not evaluated promotes nothing (``skipped``).
    """
    new = metrics.get("eval_loss")
    if new is None:
        return {"decision": "skipped", "reason": "no eval loss", "promote": False}
    gate: dict[str, Any] = {"eval_loss": new, "baseline_job": baseline_job,
                            "baseline_eval_loss": metrics.get("baseline_eval_loss")}
    if few_shot is not None:
        gate.update(few_shot_eval_loss=few_shot.get("eval_loss"), few_shot_k=few_shot.get("k"))
        if gate["few_shot_eval_loss"] is None:
            return {"decision": "skipped", "promote": False, **gate,
                    "reason": f"few-shot baseline not evaluated: {few_shot.get('skipped')}"}
    reasons, wins = [], []
    if baseline_job is None:
        reasons.append("first model of this dataset")
    elif gate["baseline_eval_loss"] is None:
        return {"decision": "skipped", "reason": f"baseline {baseline_job} was not evaluated", **gate,
                "promote": False}
    else:
        old = gate["baseline_eval_loss"]
        gate.update(delta=new - old, beats_baseline=new < old)
        wins.append(gate["beats_baseline"])
        reasons.append(f"eval loss {new:.4f} {'<' if new < old else '>='} {old:.4f} of {baseline_job}")
    if few_shot is not None:
        base = gate["few_shot_eval_loss"]
        gate.update(few_shot_delta=new - base, beats_few_shot=new < base)
        wins.append(gate["beats_few_shot"])
        reasons.append(f"eval loss {new:.4f} {'<' if new < base else '>='} {base:.4f} of the base model "
                       f"with {gate['few_shot_k']} examples in its prompt")
    promote = all(wins)
    return {"decision": "best" if promote else "not better", "reason": "; ".join(reasons), **gate,
            "promote": promote}


def check_gates(data: TrainingData, backend: str, min_train_rows: int, min_eval_rows: int) -> list[dict]:
    """The version gates, published as the ``finetune-gates`` table; SftflowError if one fails."""
    checks = version_gates(data, backend=backend, min_train_rows=min_train_rows, min_eval_rows=min_eval_rows)
    create_table_artifact(key="finetune-gates", table=checks, description=f"Fine-tune gates of {data.where}")
    require_gates(checks, data.where)
    return checks


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
check_gates_task = compute_task(name="check-gates")(check_gates)
