#!/usr/bin/env bash
# Every GPU-only path of mimco (NCCL, bf16, fp16 + scaler, FSDP, resume, fine-tuning) with PASS/FAIL,
# then the MimCo ViT-S/16 step rate and MFU. One call, 8 minutes at most on one GPU.
#   bash benchmarks/gpu_check.sh          # on the GPU machine (every visible GPU)
#   bash benchmarks/gpu_check.sh --cpu    # the same paths on the CPU with 2 gloo processes
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x "${VENV:-$HOME/.cache/mimco/venv}/bin/python" ] && PY="${VENV:-$HOME/.cache/mimco/venv}/bin/python"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" benchmarks/gpu_check.py "$@"
