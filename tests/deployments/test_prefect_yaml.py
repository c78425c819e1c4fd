"""deployments/prefect.yaml declares the same deployments as deployments/serve.py."""

from __future__ import annotations

import ast
import importlib
import re
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from sftflow.deployments.serve import ServeConfig, build_deployments
from sftflow.deployments.trainer import ENTRYPOINT as TRAIN_ENTRYPOINT

ROOT = Path(__file__).parents[2]
YAML = ROOT / "deployments" / "prefect.yaml"


def _all_yaml_deployments() -> list[dict]:
    return yaml.safe_load(YAML.read_text())["deployments"]


def _yaml_deployments() -> dict[str, dict]:
    """The deployments `sftflow serve` also makes (all but the training flow's)."""
    return {d["name"]: d for d in _all_yaml_deployments() if d["entrypoint"] != TRAIN_ENTRYPOINT}


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
    for d in _all_yaml_deployments():
        name = d["name"]
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
    assert all("sftflow" in d["tags"] for d in _all_yaml_deployments())


# -- train-trl on the Kubernetes GPU pool (infra/k8s/) -------------------------------------------
K8S = ROOT / "infra" / "k8s"
K8S_POOL = "sftflow-k8s"  # the pool infra/k8s/README.md creates


def _train() -> dict:
    (d,) = [d for d in _all_yaml_deployments() if d["entrypoint"] == TRAIN_ENTRYPOINT]
    return d


def _job_template() -> dict:
    import json

    return json.loads((K8S / "gpu-job-template.json").read_text())


def test_prefects_own_config_model_reads_the_train_deployment():
    """`prefect deploy` parses prefect.yaml with this model; the train deployment is the
    trl backend's default `train-trl/default`, on the GPU pool, started in the image's WORKDIR."""
    from prefect.cli.deploy._models import PrefectYamlModel

    from sftflow.core.settings import FinetuneSettings
    from sftflow.flows.train_trl import train_trl

    model = PrefectYamlModel.model_validate(yaml.safe_load(YAML.read_text()))
    (train,) = [d for d in model.deployments if d.entrypoint == TRAIN_ENTRYPOINT]
    assert f"{train_trl.name}/{train.name}" == FinetuneSettings().trl_deployment
    assert train.work_pool.name == K8S_POOL
    assert train.work_pool.job_variables["gpu_count"] == 1
    workdir = [ln.split()[1] for ln in (ROOT / "infra" / "Dockerfile").read_text().splitlines()
               if ln.startswith("WORKDIR ")]
    assert train.pull == [{"prefect.deployments.steps.set_working_directory":
                           {"directory": workdir[-1]}}]
    worker = yaml.safe_load_all((K8S / "worker.yaml").read_text())
    images = {c["image"] for d in worker if d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert train.work_pool.job_variables["image"] in images  # the worker's own image


def test_the_train_job_manifest_renders_with_a_gpu():
    """The pool's base job template with the deployment's job variables, rendered as the
    Kubernetes worker renders it: one `nvidia.com/gpu`, the image, the GPU node selector."""
    import jsonschema
    from prefect.utilities.templating import apply_values

    template = _job_template()
    variables = template["variables"]
    job_variables = _train()["work_pool"]["job_variables"]
    jsonschema.validate(job_variables, variables)
    values = {k: v.get("default") for k, v in variables["properties"].items()} | job_variables
    values["command"] = "python -m prefect.engine"
    manifest = apply_values(template["job_configuration"]["job_manifest"], values)
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1, "memory": "32Gi"}
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}
    assert container["image"] == job_variables["image"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 86400


@pytest.fixture()
def own_prefect_api():
    """A Prefect test harness of this test's own. `prefect deploy --all` registers
    `train-trl/default` on the GPU pool: on the session's harness it would repoint the
    deployment that `train_worker` (tests/tasks/_finetune.py) serves whenever a fine-tune test
    ran earlier in the same process (which order an xdist worker runs its tests in varies)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.prefect
def test_prefect_deploy_all_accepts_the_file(own_prefect_api):
    """`prefect deploy --all` against a real Prefect API, with the pools the docs create:
    every deployment is registered; the server checked the train deployment's job variables
    against the GPU pool's template (it refuses a wrong type, shown last)."""
    import os
    import subprocess
    import sys

    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        for name, type_, template in (
            ("sftflow", "process", ProcessWorker.get_default_base_job_template()),
            ("sftflow-train", "process", ProcessWorker.get_default_base_job_template()),
            (K8S_POOL, "kubernetes", _job_template()),
        ):
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=type_,
                                                       base_job_template=template))
            except ObjectAlreadyExists:
                pass
    prefect = str(Path(sys.executable).parent / "prefect")
    res = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(YAML)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "SFTFLOW_HOME": str(ROOT),
             "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                         os.environ.get("PYTHONPATH")]))},
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    with get_client(sync_client=True) as client:
        train = client.read_deployment_by_name("train-trl/default")
        assert train.work_pool_name == K8S_POOL and train.work_queue_name == "gpu"
        assert train.job_variables["gpu_count"] == 1
        assert train.pull_steps == _train()["pull"]
        assert set(train.tags) == {"sftflow", "train"}
        for flow_name, name in (("ingest-prompts", "ingest"), ("build-dataset", "build-dataset"),
                                ("finetune", "finetune"),
                                ("check-annotations", "check-annotations")):
            assert client.read_deployment_by_name(f"{flow_name}/{name}").work_pool_name
        with pytest.raises(httpx.HTTPStatusError, match="422") as refused:
            client.create_deployment(flow_id=train.flow_id, name="wrong-gpu",
                                     work_pool_name=K8S_POOL, job_variables={"gpu_count": "one"})
        assert "gpu_count" in refused.value.response.text
