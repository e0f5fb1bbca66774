#!/usr/bin/env bash
# The GPU check: CUDA tests and speed benchmarks in one run of under 9 minutes, no internet needed.
#
#   tools/gpu_check.sh [OUT_DIR]      # on the GPU machine; OUT_DIR defaults to $OUT, else ./gpu_check
#   tools/gpu_check.sh --smoke [DIR]  # about a minute on the CPU: checks the script, not the numbers
#
# Each stage has its own time limit; see tools/gpu_check.py for the stages. Results: DIR/summary.txt,
# DIR/summary.json, and one <stage>.txt (and .json) per stage. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" tools/gpu_check.py "$@"
