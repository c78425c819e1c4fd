"""deployments/prefect.yaml declares the same deployments as deployments/serve.py."""

from __future__ import annotations

import ast
import importlib
import re
from datetime import timedelta
from pathlib import Path

import yaml

from sftflow.deployments.serve import ServeConfig, build_deployments

ROOT = Path(__file__).parents[2]
YAML = ROOT / "deployments" / "prefect.yaml"


def _yaml_deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load(YAML.read_text())["deployments"]}


def _served() -> dict:
    cfg = ServeConfig(source="s3://sftflow/prompts/", project="sft-prompts", dataset="sft",
                      min_new=100, base_model="s3://sftflow/models/base/tiny")
    return {d.name: d for d in build_deployments(cfg)}


def test_same_deployments_flows_and_parameters():
    declared, served = _yaml_deployments(), _served()
    assert declared.keys() == served.keys() == {"ingest", "check-annotations", "build-dataset",
                                                "finetune"}
    for name, d in declared.items():
        module, _, func = d["entrypoint"].partition(":")
        flow = getattr(importlib.import_module("sftflow." + module.removesuffix(".py").replace("/", ".")), func)
        assert flow.name == served[name].flow_name
        assert d["parameters"] == served[name].parameters, name
        # The default parameters are a valid form for the flow's one parameter model.
        model = flow.fn.__annotations__["params"]
        model = model if isinstance(model, type) else vars(importlib.import_module(flow.fn.__module__))[model]
        model.model_validate(d["parameters"]["params"])
        schedules = [s.schedule for s in served[name].schedules or []]
        for declared_schedule, schedule in zip(d.get("schedules", []), schedules, strict=True):
            if "cron" in declared_schedule:
                assert schedule.cron == declared_schedule["cron"]
            else:
                assert schedule.interval == timedelta(seconds=declared_schedule["interval"])
        limit = d["concurrency_limit"]
        assert served[name].concurrency_limit == limit["limit"] == 1


def test_same_triggers():
    declared, served = _yaml_deployments(), _served()
    for name, d in declared.items():
        mine = served[name].triggers
        assert len(d.get("triggers", [])) == len(mine), name
        for t, s in zip(d.get("triggers", []), mine, strict=True):
            assert set(t["expect"]) == s.expect
            assert t["match"] == s.match.model_dump(), name
            assert set(t.get("for_each", [])) == s.for_each
            assert timedelta(seconds=t.get("within", 0)) == s.within
            assert t["parameters"] == s.parameters, name


def test_entrypoints_are_paths_from_a_checkout():
    for name, d in _yaml_deployments().items():
        path, _, func = d["entrypoint"].partition(":")
        assert not Path(path).is_absolute() and ".." not in Path(path).parts, name
        tree = ast.parse((ROOT / path).read_text())
        assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, name


def test_no_path_of_one_machine():
    """Every command and path in the file works from any checkout (s3:// URIs are not paths)."""
    text = YAML.read_text()
    assert re.findall(r"(?:^|[\s`\"'(=])(/[\w.-]+/[\w./-]*)", text, re.MULTILINE) == []
    assert "cd /" not in text


def test_the_failure_automation_is_a_valid_prefect_automation():
    """deployments/automations.yaml parses into Prefect's own automation model, and it fires
    on failed, crashed or timed-out runs of the `sftflow`-tagged deployments."""
    import yaml
    from prefect.events.schemas.automations import AutomationCore

    path = Path(__file__).parents[2] / "deployments" / "automations.yaml"
    (doc,) = yaml.safe_load(path.read_text())["automations"]
    automation = AutomationCore.model_validate(doc)
    assert automation.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed",
                                         "prefect.flow-run.TimedOut"}
    assert automation.actions[0].type == "send-notification"
    tags = {t for d in _yaml_deployments().values() for t in d.get("tags", [])}
    assert "sftflow" in tags  # what the trigger matches is on every deployment
