#!/usr/bin/env bash
# The GPU check on a lent machine of the device tool (Python 3.12 image with CUDA torch, no network):
# install the wheels `make gpu-wheels` put in .whl/ (carried with the working tree), then run the
# check with its JSON written to $OUT. Run from the repository root:
#   device run: bash benchmarks/gpu_check_device.sh        (carry: [".whl"], timeout_s: 600)
set -euo pipefail
: "${OUT:?OUT must name the folder the JSON goes to}"
ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run make gpu-wheels here first and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
python3 benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
