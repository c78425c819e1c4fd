"""The build's warm-up thread: what a build needs late is loaded while it waits."""

from __future__ import annotations

import subprocess
import sys


def test_matplotlib_and_the_dedup_kernels_are_loaded_in_the_background():
    code = (
        "import sys; from sftflow.tasks.build.warm import warm_in_background; "
        "assert 'matplotlib' not in sys.modules; warm_in_background().join(120); "
        "assert 'matplotlib.figure' in sys.modules; "
        "from sftflow.tasks.dedup import kernel; "
        "assert all(f.overloads for f in (kernel.fingerprint_batch, kernel.agreement, "
        "kernel.components)), 'kernels not loaded'; "
        # a later build in the same process (a served deployment, a test worker) warms nothing
        "assert warm_in_background() is warm_in_background()")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
