#!/usr/bin/env bash
# GPU check of the cuda target (benchmarks/gpu_check.py has the details).
#
#   benchmarks/gpu_check.sh pack [ARCH]   here: compile the zoo for ARCH (default sm_90), save onnxruntime references,
#                                         gather the runtime bundle into benchmarks/gpu_bundle/ (< 64 MiB)
#   benchmarks/gpu_check.sh run           on the GPU machine (Python 3.12 + torch CUDA, no TVM): run, check, time;
#                                         JSON in $OUT/gpu_check.json
#
# With the device tool: run(command="benchmarks/gpu_check.sh run", carry=["benchmarks/gpu_bundle"], timeout_s=360).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  pack) python benchmarks/gpu_check.py pack --arch "${2:-sm_90}" --out benchmarks/gpu_bundle ;;
  run)  python3 benchmarks/gpu_check.py run --bundle benchmarks/gpu_bundle --out "${OUT:-gpu_out}" ;;
  *)    sed -n '2,10p' "$0"; exit 2 ;;
esac
