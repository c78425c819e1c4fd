#!/usr/bin/env bash
# The training throughput benchmark (bench/train_throughput.py) on a GPU machine.
#
# Two steps, because the GPU machine reaches no package index and its image has torch,
# transformers and accelerate but not trl, datasets, pydantic, prefect or sftflow:
#
#   1. here, with the repo's .venv:   bash bench/gpu_throughput.sh --fetch-wheels
#      -> .whl/: the wheels (cp312, manylinux, the .venv's versions) of every distribution the
#         benchmark imports that the GPU image lacks (and transformers / tokenizers /
#         huggingface_hub, pinned to the .venv's), sftflow's own wheel, and the head of
#         ../shared/data/t0_train_50k.jsonl.gz (../shared does not travel). .whl/ is added to
#         .git/info/exclude; it stays under the device tool's 64 MiB.
#   2. there (device tool: run with carry [".whl"]):   bash bench/gpu_throughput.sh
#      -> installs .whl/*.whl into /tmp/site (no index), runs
#         `python bench/train_throughput.py --gpu`, copies the JSON to $OUT when set, prints its path.
#
# A machine whose .venv/bin/python already has CUDA torch and the packages just uses it.
# Budget: model init + 6 configurations x 20 steps, about 3-6 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
IMAGE_HAS="torch triton nvidia accelerate safetensors numpy pandas pyarrow fsspec filelock jinja2 markupsafe
pyyaml packaging psutil regex tqdm typing-extensions requests urllib3 idna certifi charset-normalizer
click rich pygments markdown-it-py mdurl anyio sniffio h11 httpx httpcore attrs six python-dateutil
cloudpickle humanize pathspec protobuf prometheus-client xxhash sympy mpmath networkx setuptools
colorama hf-xet typer shellingham scipy pillow peft sentencepiece tiktoken"

fetch_wheels() {
  local py=.venv/bin/python
  mkdir -p "$WHEELS" "$WHEELS/data"
  grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
  # name==version of every distribution the benchmark imports, less what the GPU image has
  IMAGE_HAS="$IMAGE_HAS" $py - > "$WHEELS/requirements.txt" <<'EOF'
import os, sys
sys.path.insert(0, "bench")
import train_throughput  # noqa: F401
import datasets, trl, sftflow.tasks.finetune.training, sftflow.tasks.finetune.tiny_model  # noqa: F401
from trl import SFTTrainer  # noqa: F401
from importlib.metadata import packages_distributions, version
norm = lambda n: n.lower().replace("_", "-")
have = {norm(n) for n in os.environ["IMAGE_HAS"].split()}
pd = packages_distributions()
dists = {norm(d) for m in list(sys.modules) for d in pd.get(m.split(".")[0], [])}
for d in sorted(dists):
    if d == "sftflow" or d in have or d.startswith(("nvidia-", "torch", "google-auth")):
        continue
    print(f"{d}=={version(d)}")
EOF
  echo "fetching $(wc -l < "$WHEELS/requirements.txt") wheels for python 3.12 (see $WHEELS/requirements.txt)"
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEELS" -r "$WHEELS/requirements.txt"
  $py -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" .
  local data="${SFTFLOW_SHARED_DATA:-../shared/data}/t0_train_50k.jsonl.gz"
  if [ -f "$data" ]; then
    zcat "$data" | head -n 8000 | gzip > "$WHEELS/data/t0_train_50k.jsonl.gz"
  fi
  du -sh "$WHEELS"
}

pick_python() {
  for py in .venv/bin/python python3; do
    if command -v "$py" >/dev/null && "$py" -c "import torch, trl; assert torch.cuda.is_available()" 2>/dev/null; then
      echo "$py"; return
    fi
  done
  echo python3
}

run_gpu() {
  if ! python3 -c "import trl" 2>/dev/null && [ -d "$WHEELS" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [ -f "$WHEELS/data/t0_train_50k.jsonl.gz" ] && [ ! -f ../shared/data/t0_train_50k.jsonl.gz ]; then
    export SFTFLOW_SHARED_DATA="$PWD/$WHEELS/data"
  fi
  local py out
  py=$(pick_python)
  out=bench/results/train_throughput.json
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  PYTHONUNBUFFERED=1 "$py" bench/train_throughput.py --gpu --out "$out"
  if [ -n "${OUT:-}" ]; then cp "$out" "$OUT/"; fi
  echo "results: $out"
}

case "${1:-}" in
  --fetch-wheels) fetch_wheels ;;
  "") run_gpu ;;
  *) echo "usage: $0 [--fetch-wheels]" >&2; exit 2 ;;
esac
