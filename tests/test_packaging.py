"""The built wheel, installed into a fresh virtual environment: only ``sftflow`` at the top
level of site-packages (no ``tasks``, ``flows``, ``infra`` or ``deployments`` to collide with a
user's own), and the CLI works from it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
UV = Path(sys.executable).parent / "uv"


@pytest.mark.skipif(not UV.exists(), reason="uv is installed by `make install`")
def test_wheel_installs_only_the_sftflow_namespace_and_runs(tmp_path):
    run = lambda *argv: subprocess.run(
        [str(a) for a in argv], check=True, capture_output=True, text=True, timeout=600)
    run(UV, "build", "--wheel", "-q", "-o", tmp_path / "dist", ROOT)
    wheel = next((tmp_path / "dist").glob("sftflow-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"sftflow"}
    assert "sftflow/flows/ingest.py" in zipfile.ZipFile(wheel).namelist()

    venv = tmp_path / "venv"
    run(UV, "venv", "-q", "-p", sys.executable, venv)
    # The locked versions (from the package cache `make install` filled), core dependencies only.
    run(UV, "pip", "install", "-q", "--python", venv / "bin" / "python", wheel,
        "-c", ROOT / "requirements" / "lock.txt")
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not {"tasks", "flows", "infra", "deployments"} & {p.name for p in site.iterdir()}
    help_text = run(venv / "bin" / "sftflow", "--help").stdout
    assert "stack" in help_text and "ingest" in help_text
    flows = run(venv / "bin" / "python", "-c",
                "import sftflow.flows.ingest as m; print(m.ingest_prompts.name)").stdout
    assert flows.strip() == "ingest-prompts"
