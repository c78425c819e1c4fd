"""Build attempts per threshold crossing (pure: no Prefect)."""

from sftflow.tasks.triggers.crossings import (
    attempt_number,
    build_parameters,
    crossing_tag,
    next_attempt,
)

K = "build:7:d:None:tasks:1:100"


def test_first_attempt_keeps_the_crossing_key():
    a = next_attempt(K, [])
    assert (a.key, a.number, a.reuse_run_id) == (K, 1, None) and a.tag == crossing_tag(K)


def test_an_active_attempt_is_reused_and_an_ended_one_is_followed():
    assert next_attempt(K, [("r1", K, "SCHEDULED")]).reuse_run_id == "r1"
    for ended in ("FAILED", "CRASHED", "CANCELLED", "COMPLETED"):
        a = next_attempt(K, [("r1", K, ended)])
        assert (a.key, a.number, a.reuse_run_id) == (f"{K}:attempt-2", 2, None)
    runs = [("r1", K, "FAILED"), ("r3", f"{K}:attempt-3", "RUNNING"),
            ("r2", f"{K}:attempt-2", "FAILED")]
    assert next_attempt(K, runs).reuse_run_id == "r3"


def test_keys_of_other_crossings_are_ignored():
    assert attempt_number(K, f"{K}0:attempt-2") == 0
    assert attempt_number(K, "other") == 0 and attempt_number(K, f"{K}:attempt-12") == 12
    assert next_attempt(K, [("x", "build:8:d:None:tasks:1:100", "FAILED")]).number == 1


def test_the_build_run_keeps_the_deployments_parameters_under_the_checks_settings():
    deployed = {"params": {"project": "sft-prompts", "dataset": "sft", "bucket": "b-configured",
                           "filters": {"max_chars": 100}}, "other": 1}
    assert build_parameters(deployed, {"project": "7", "dataset": "sft", "bucket": "b-check"}) == {
        "params": {"project": "7", "dataset": "sft", "bucket": "b-check",
                   "filters": {"max_chars": 100}}, "other": 1}
    # a setting the check was not given keeps the deployment's value
    assert build_parameters(deployed, {"project": "7", "bucket": None})["params"]["bucket"] == (
        "b-configured")
    assert build_parameters(None, {"project": "7", "dataset": "d", "bucket": "b"}) == {
        "params": {"project": "7", "dataset": "d", "bucket": "b"}}
    assert deployed["params"]["project"] == "sft-prompts"  # not changed in place
