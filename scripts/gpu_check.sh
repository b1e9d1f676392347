#!/usr/bin/env bash
# One command for the first CUDA GPU: the cuda tests, the demo on the GPU, streamed GPTQ of a random 8B-shape model
# and the bench, in one report (gpu-check/report.md). --dry-run prints the steps without a GPU. See gpu_check.py.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
exec "$PYTHON" "$ROOT/scripts/gpu_check.py" "$@"
