"""CLI failure modes: one clear line naming what and where, non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SFTFLOW = str(Path(sys.executable).parent / "sftflow")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SFTFLOW, *args], check=False, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_unreachable_service_is_one_line(tmp_path):
    # Nothing listens on port 9 (discard) here.
    res = run("check", env={"SFTFLOW_S3__ENDPOINT_URL": "http://127.0.0.1:9",
                            "SFTFLOW_S3__MAX_ATTEMPTS": "1"})
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "S3 at http://127.0.0.1:9" in lines[0]


def test_debug_shows_the_traceback():
    res = run("--debug", "check", env={"SFTFLOW_S3__ENDPOINT_URL": "http://127.0.0.1:9",
                                       "SFTFLOW_S3__MAX_ATTEMPTS": "1"})
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_unknown_service_name():
    res = run("stack", "status", "nosuch")
    assert res.returncode == 1 and "unknown service 'nosuch'" in res.stderr


@pytest.mark.integration
def test_wrong_labelstudio_token(stack):
    res = run("check", env={"SFTFLOW_LABELSTUDIO__API_KEY": "wrong-token-000"})
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "refused the API key (401)" in res.stderr
    assert "wrong-token-000" not in res.stderr + res.stdout


@pytest.mark.integration
def test_check_json_hides_secrets(stack):
    res = run("check", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["labelstudio"]["ok"] and out["s3"]["ok"]
    secret = stack.labelstudio.api_key.get_secret_value()
    assert secret not in res.stdout
    assert stack.s3.secret_access_key.get_secret_value() not in res.stdout


def test_bridge_beyond_loopback_with_the_default_secret_is_refused():
    res = run("webhooks", "serve", "--host", "0.0.0.0", "--port", "9")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "beyond loopback, with the default secret" in res.stderr
