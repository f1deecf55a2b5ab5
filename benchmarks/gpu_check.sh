#!/usr/bin/env bash
# The GPU check: gpu profile, in-process, split seeds 0-4; one JSON and a log in OUT_DIR.
#   bash benchmarks/gpu_check.sh OUT_DIR [key=value ...]
# Needs torch (+ CUDA), accelerate, scikit-learn, pyyaml, matplotlib; not Ray, not MLflow.
# MNIST: data.root=... or $TOOLKIT_DATA_DIR (a folder holding MNIST/raw).
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [key=value ...]" >&2; exit 2; fi
out="$1"; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
python3 "$here/gpu_check.py" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
