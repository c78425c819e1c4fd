"""Failpoints: parsing, the @N counter, raise and sleep in-process, crash in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from sftflow.core import failpoints
from sftflow.core.failpoints import Action, FailpointError, active, failpoint, parse


def test_parse_and_refuse_unknown_points_and_actions():
    assert parse("versioning.after-manifest=crash; gc.before-delete=sleep(1.5)@2") == {
        "versioning.after-manifest": Action("crash"),
        "gc.before-delete": Action("sleep", 1.5, 2),
    }
    with pytest.raises(ValueError, match="unknown failpoint 'versioning.after-manfest'"):
        parse("versioning.after-manfest=crash")
    with pytest.raises(ValueError, match="bad action"):
        parse("versioning.after-manifest=explode")


def test_inactive_points_do_nothing_and_raise_fires_on_the_nth_hit():
    failpoint("versioning.after-manifest")  # not active: nothing
    with active({"versioning.after-manifest": "raise@2"}):
        failpoint("versioning.after-manifest")
        with pytest.raises(FailpointError, match="hit 2"):
            failpoint("versioning.after-manifest")
        failpoint("versioning.after-manifest")  # the 3rd hit passes again
        failpoint("versioning.after-ref")  # another point: not active


def test_sleep_stalls_the_step():
    with active({"gc.before-delete": "sleep(0.3)"}):
        t = time.monotonic()
        failpoint("gc.before-delete")
        assert time.monotonic() - t >= 0.3


def test_crash_kills_the_process_at_that_step():
    code = ("from sftflow.core.failpoints import failpoint\n"
            "print('before', flush=True)\n"
            "failpoint('versioning.after-manifest')\n"
            "print('after', flush=True)\n")
    env = {**os.environ, failpoints.ENV: "versioning.after-manifest=crash"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=False,
                         timeout=60)
    assert res.returncode == -signal.SIGKILL
    assert res.stdout == "before\n"
