#!/usr/bin/env bash
# MimCo step throughput, peak memory and MFU on one NVIDIA GPU (ViT-S/16, 224 px, bf16, batch 256).
#   bash benchmarks/gpu_check.sh           # under 5 minutes on an H100
#   bash benchmarks/gpu_check.sh --tiny    # a seconds-long version that runs on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x "${VENV:-$HOME/.cache/mimco/venv}/bin/python" ] && PY="${VENV:-$HOME/.cache/mimco/venv}/bin/python"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" benchmarks/gpu_check.py "$@"
