#!/usr/bin/env bash
# GPU check of the cuda target (benchmarks/gpu_check.py has the details). PLAN: ocr (PP-OCR det/cls/rec, Magika,
# Silero VAD; 41 MiB), minilm (MiniLM-L6 in fp16; 54 MiB) or llm (a tiny Llama decoder fp32 + int4, MiniLM-L6 int4:
# effc's CUDA lowerings); each bundle stays under one device call's 64 MiB.
#
#   benchmarks/gpu_check.sh pack PLAN [ARCH]  here: compile PLAN's zoo models for ARCH (default sm_90), save
#                                             onnxruntime references, gather the runtime bundle into
#                                             benchmarks/gpu_bundle_PLAN/
#   benchmarks/gpu_check.sh run PLAN          GPU machine (Python 3.12 + torch CUDA, no TVM): run, check, time;
#                                             JSON in $OUT/gpu_check.json
#
# With the device tool: run(command="benchmarks/gpu_check.sh run ocr", carry=["benchmarks/gpu_bundle_ocr"],
# timeout_s=360); then the same for minilm and llm.
set -euo pipefail
cd "$(dirname "$0")/.."
plan="${2:-}"
case "${1:-}:${plan}" in
  pack:ocr|pack:minilm|pack:llm) python benchmarks/gpu_check.py pack --plan "$plan" --arch "${3:-sm_90}" \
                          --out "benchmarks/gpu_bundle_${plan}" ;;
  run:ocr|run:minilm|run:llm) python3 benchmarks/gpu_check.py run --bundle "benchmarks/gpu_bundle_${plan}" \
                          --out "${OUT:-gpu_out}/${plan}" ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
