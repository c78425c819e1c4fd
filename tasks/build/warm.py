"""What a build needs late, loaded early: a daemon thread started as the build begins, while
its first seconds wait on Label Studio.

In a fresh process (a work pool's flow run, the CLI) a build otherwise pays, on its critical
path: matplotlib's import (about 1 s) and its first drawing (fonts, about 0.5 s) when it draws
the version's pictures, and numba's start-up when it fingerprints the first rows (its
registries and runtime, about 1.3 s, even with every kernel in numba's on-disk cache).
Once a process: a later build in the same process (a served deployment, a test worker) finds
all of it loaded, and drawing the warm-up figure again would only cost CPU.
"""

from __future__ import annotations

import io
import threading

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _warm() -> None:
    from matplotlib.figure import Figure

    from sftflow.tasks.dedup.minhash import compile_kernels

    fig = Figure(figsize=(1, 1), dpi=20)
    ax = fig.add_subplot()
    ax.bar(["1", "2"], [10, 1000])
    ax.set_title("warm")
    fig.savefig(io.BytesIO(), format="png")
    compile_kernels()


def warm_in_background() -> threading.Thread:
    """Start loading matplotlib (and its fonts) and the dedup kernels in a daemon thread, the
    first time in this process; later calls return that thread."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_warm, name="sftflow-warm-up", daemon=True)
            _thread.start()
        return _thread
