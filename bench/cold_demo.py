"""The cold demo: `sftflow stack up` of an empty stack folder, then `sftflow demo` (issue #19 asks
for 3 minutes; the install is not counted), with the migrated database templates
(``infra/templates.py``) against without them (every database migrated at its start, as before),
side by side in one run on the same machine.

    .venv/bin/python bench/cold_demo.py [--order off,on]

Each variant gets a stack folder of its own (empty), a demo folder of its own (the tiny model
built again), and the same ports (``SFTFLOW_STACK__*`` from the environment, else the bench's
own: 27xxx), one after the other, the stack stopped between them. "on" uses the machine's
template cache (``stack.template_dir``) and makes the templates first if it is empty (that
first making is timed and reported apart, not counted in "on"). Writes
bench/results/cold_demo.json with the load average before each step. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "cold_demo.json"
SFTFLOW = str(Path(sys.executable).with_name("sftflow"))
TARGET_S = 180.0
PORTS = {"S3_PORT": 27333, "WEED_MASTER_PORT": 27334, "WEED_VOLUME_PORT": 27081,
         "WEED_FILER_PORT": 27889, "LABEL_STUDIO_PORT": 27080, "PREFECT_PORT": 27200,
         "POSTGRES_PORT": 27432}


def env_for(stack_dir: Path, templates: bool) -> dict[str, str]:
    env = {**os.environ, "SFTFLOW_STACK__DIR": str(stack_dir),
           "SFTFLOW_STACK__TEMPLATES": "true" if templates else "false",
           "SFTFLOW_STACK__POSTGRES": "false"}
    for name, port in PORTS.items():
        env.setdefault(f"SFTFLOW_STACK__{name}", str(port))
    env.setdefault("SFTFLOW_S3__ENDPOINT_URL", f"http://127.0.0.1:{env['SFTFLOW_STACK__S3_PORT']}")
    env.setdefault("SFTFLOW_LABELSTUDIO__URL",
                   f"http://127.0.0.1:{env['SFTFLOW_STACK__LABEL_STUDIO_PORT']}")
    env.setdefault("SFTFLOW_PREFECT__API_URL",
                   f"http://127.0.0.1:{env['SFTFLOW_STACK__PREFECT_PORT']}/api")
    return env


def timed(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            check=False, timeout=1800).returncode
    return time.perf_counter() - t0, rc


def one(variant: str, scratch: Path) -> dict:
    """Stack up from an empty folder, the demo in a fresh folder, stack down."""
    stack_dir, work = scratch / f"stack-{variant}", scratch / f"work-{variant}"
    work.mkdir(parents=True)
    env = env_for(stack_dir, variant == "on")
    load = round(os.getloadavg()[0], 2)
    try:
        up_s, up_rc = timed([SFTFLOW, "stack", "up"], env, ROOT, scratch / f"up-{variant}.log")
        demo_s, demo_rc = timed([SFTFLOW, "demo", "--workdir", str(work / ".demo")], env, ROOT,
                                scratch / f"demo-{variant}.log")
    finally:
        subprocess.run([SFTFLOW, "stack", "down"], env=env, cwd=ROOT, capture_output=True,
                       check=False, timeout=300)
    tail = (scratch / f"demo-{variant}.log").read_text(errors="replace").splitlines()[-3:]
    return {"templates": variant, "stack_up_s": round(up_s, 1), "demo_s": round(demo_s, 1),
            "total_s": round(up_s + demo_s, 1), "ok": up_rc == 0 and demo_rc == 0,
            "load_avg_1m_before": load, "demo_tail": tail}


def make_templates(scratch: Path) -> dict[str, object]:
    """Make the templates if the cache lacks them (an "on" stack would make them itself, once
    per machine): timed apart so that "on" measures a machine that has them. Reports whether
    the cache already held templates: then the step is only a stack's start and stop."""
    from sftflow.core.settings import Settings

    folder = Path(Settings().stack.template_dir)
    cached = folder.is_dir() and any(folder.glob("*.sqlite3"))
    env = env_for(scratch / "stack-templates", True)
    t0 = time.perf_counter()
    subprocess.run([SFTFLOW, "stack", "up", "labelstudio", "prefect"], env=env, cwd=ROOT,
                   capture_output=True, check=True, timeout=900)
    subprocess.run([SFTFLOW, "stack", "down"], env=env, cwd=ROOT, capture_output=True,
                   check=False, timeout=300)
    return {"templates_cached_before": cached,
            "templates_step_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--order", default="off,on", help="variants in the order they run")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="sftflow-cold-demo-"))
    try:
        first = make_templates(scratch)
        runs = [one(v, scratch) for v in args.order.split(",")]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    by = {r["templates"]: r for r in runs}
    result = {
        "bench": "cold_demo", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "target_total_s": TARGET_S, **first, "runs": runs,
        "met_with_templates": bool(by.get("on", {}).get("ok")) and by["on"]["total_s"] <= TARGET_S,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for r in runs:
        print(f"templates {r['templates']:>3}: stack up {r['stack_up_s']:6.1f} s, demo "
              f"{r['demo_s']:6.1f} s, total {r['total_s']:6.1f} s (ok: {r['ok']}, "
              f"load {r['load_avg_1m_before']})")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
