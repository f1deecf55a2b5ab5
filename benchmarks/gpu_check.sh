#!/usr/bin/env bash
# The GPU check, two parts; each writes a JSON and a log in OUT_DIR.
#   bash benchmarks/gpu_check.sh OUT_DIR [key=value ...]
# local: the gpu profile in-process on split seeds 0-4 (gpu_check.py -> gpu_check.json).
#   Needs torch (+ CUDA), accelerate, scikit-learn, pyyaml, matplotlib, seaborn (with pandas: the plots);
#   not Ray, not MLflow.
# ray: the GPU paths of Ray, on one GPU (gpu_check_ray.py -> gpu_check_ray.json): Accelerate in a Ray
#   Train worker (NCCL, bf16), Ray Data actors with num_gpus, Tune trials on fractional GPUs. Needs
#   toolkit's full install (ray[train,tune,data], mlflow); where Ray is missing it says so in one line.
# GPU_CHECK_PARTS="local" (or "ray") runs one part; a part that fails does not stop the other, and the
# exit status is the last failing part's.
# MNIST: run.data_root=... or $TOOLKIT_DATA_DIR (a folder holding MNIST/raw).
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [key=value ...]" >&2; exit 2; fi
out="$1"; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
rc=0
for part in ${GPU_CHECK_PARTS:-local ray}; do
  case "$part" in
    local) script="gpu_check.py"; log="gpu_check.log" ;;
    ray) script="gpu_check_ray.py"; log="gpu_check_ray.log" ;;
    *) echo "gpu_check: error: GPU_CHECK_PARTS names '$part'; the parts are local and ray" >&2; exit 2 ;;
  esac
  set +e
  python3 "$here/$script" "$@" 2>&1 | tee "$out/$log"
  status="${PIPESTATUS[0]}"
  set -e
  if [ "$status" -ne 0 ]; then rc="$status"; fi
done
exit "$rc"
