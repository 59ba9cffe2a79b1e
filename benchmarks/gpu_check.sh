#!/usr/bin/env bash
# Every GPU-only path of mimco (NCCL, bf16, fp16 + scaler, FSDP, resume, fine-tuning, segmentation) with PASS/FAIL,
# then the MimCo ViT-S/16 step rate and MFU. One call, at most 8 minutes on one GPU (--budget).
#   bash benchmarks/gpu_check.sh          # on the GPU machine (every visible GPU)
#   bash benchmarks/gpu_check.sh --cpu    # the same paths on the CPU with 2 gloo processes
# Python: $PYTHON, else the Makefile's venv, else python3 (a lent machine's image). Requirements that
# Python lacks (kornia there) are installed from the wheel folder (`make device-wheels`, carried as
# .device-wheels) into a folder of their own, never from the network. With $OUT set (the device
# tool), everything printed goes to $OUT/gpu_check.log as it is printed, and the report to
# $OUT/gpu_check.md and $OUT/gpu_check.json path by path.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-$HOME/.cache/mimco/venv}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; else PY=python3; fi
fi
WHEELS="${MIMCO_WHEELS:-.device-wheels}"
SITE="${MIMCO_SITE:-${TMPDIR:-/tmp}/mimco-site}"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
need="$("$PY" benchmarks/device_env.py missing)"
if [ -n "$need" ]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: $PY lacks $(echo $need | tr '\n' ' ')and there is no wheel folder $WHEELS; run \`make device-wheels\` on a machine with the package index and carry .device-wheels (docs/performance.md#gpu-check)" >&2
    exit 2
  fi
  todo="$("$PY" benchmarks/device_env.py plan --dir "$WHEELS")"  # and what their wheels need (kornia: kornia_rs)
  echo "gpu_check: installing $(echo $todo | tr '\n' ' ')from $WHEELS into $SITE (no index)"
  rm -rf "$SITE"
  # shellcheck disable=SC2086
  if ! "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --find-links "$WHEELS" \
        --target "$SITE" $todo; then
    echo "gpu_check: $WHEELS does not hold $(echo $todo | tr '\n' ' ')for this Python; run \`make device-wheels\` again and carry .device-wheels" >&2
    exit 2
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  still="$("$PY" benchmarks/device_env.py missing)"
  if [ -n "$still" ]; then
    echo "gpu_check: still missing after installing from $WHEELS: $(echo $still | tr '\n' ' ')" >&2
    exit 2
  fi
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
