"""``sftflow wait`` / ``run`` / ``labelstudio register-webhook`` on the local stack: exit codes
and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftflow.tasks.ingest.projects import SFT_LABEL_CONFIG
from tests.conftest import unique

pytestmark = pytest.mark.integration
SFTFLOW = str(Path(sys.executable).parent / "sftflow")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SFTFLOW, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ}, check=False)


def test_wait_times_out_with_exit_code_2_and_a_clear_message(labelstudio):
    p = labelstudio.projects.create(title=unique("t-cli"), label_config=SFT_LABEL_CONFIG)
    try:
        res = run("wait", "--project", p.title, "--min-new", "5", "--timeout", "1",
                  "--min-interval", "0.5", "--json")
    finally:
        labelstudio.projects.delete(id=p.id)
    assert res.returncode == 2, res.stderr
    report = json.loads(res.stdout)
    assert report["message"] == "not enough annotations yet: 0 of 5" and not report["reached"]


def test_missing_project_and_bad_url_are_one_line_errors(stack):
    res = run("wait", "--project", unique("no-such-project"), "--min-new", "1", "--timeout", "1")
    assert res.returncode == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = run("labelstudio", "register-webhook", "--project", "x", "--url", "ftp://nope")
    assert res.returncode == 1 and "--url must be an http(s) URL" in res.stderr
