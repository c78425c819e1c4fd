"""Every flow's runs get a readable name from their parameters (dataset, version, project),
rendered the way Prefect's engine renders it (``resolve_custom_flow_run_name``)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from prefect import Flow
from prefect._internal.engine import resolve_custom_flow_run_name

import sftflow.flows
from sftflow.flows.build_dataset import BuildParams, build_dataset
from sftflow.flows.check_annotations import CheckParams, check_annotations
from sftflow.flows.finetune import FinetuneParams, finetune
from sftflow.flows.pipeline import PipelineParams, sft_pipeline
from sftflow.flows.train_trl import train_trl
from sftflow.flows.wait_for_annotations import WaitParams, wait_for_annotations
from sftflow.tasks.finetune.backends import JobSpec


def _flows() -> list[Flow]:
    out = []
    for mod in pkgutil.iter_modules(sftflow.flows.__path__):
        module = importlib.import_module(f"sftflow.flows.{mod.name}")
        out += [v for v in vars(module).values()
                if isinstance(v, Flow) and v.fn.__module__ == module.__name__]
    return out


def test_every_flow_names_its_runs():
    flows = _flows()
    assert len(flows) >= 8
    assert [f.name for f in flows if not isinstance(f.flow_run_name, str)] == []


@pytest.mark.parametrize(("flow", "params", "expected"), [
    (build_dataset, BuildParams(project="support-sft", dataset="support"),
     "build support from support-sft"),
    (check_annotations, CheckParams(project="support-sft", dataset="support", min_new=100),
     "check support-sft for support"),
    (sft_pipeline, PipelineParams(source="s3://b/p/", project="support-sft", dataset="support"),
     "pipeline support-sft -> support"),
    (wait_for_annotations, WaitParams(project="support-sft", min_new=50),
     "wait support-sft: 50 new"),
    (finetune, FinetuneParams(dataset="support@0123abcd", base_model="tiny"),
     "finetune support@0123abcd on tiny"),
    (train_trl, JobSpec(job="ft-1a2b", dataset="support", version="0123abcd", base_model="tiny",
                        train_files=[], eval_files=[], output_uri="s3://b/models/ft-1a2b"),
     "train support@0123abcd job ft-1a2b"),
])
def test_run_names_render_from_the_parameters(flow, params, expected):
    assert resolve_custom_flow_run_name(flow, {"params": params}) == expected
