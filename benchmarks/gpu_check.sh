#!/usr/bin/env bash
# GPU proof on one GPU in <= 10 minutes: the reference config in fp32, bf16-mixed, 1-process DDP over NCCL and
# DeepSpeed ZeRO-2, the Clusterer batched API on cuda and a forward forced onto SDPA's flash kernel; prints tokens/s, episodes/s, peak memory and MFU and
# rewrites the GPU section of BENCHMARKS.md (see benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh            # on a GPU node
#   benchmarks/gpu_check.sh --cpu      # the same path on CPU at tiny sizes (checks the script only)
#   benchmarks/gpu_check.sh --cpu --bf16   # ... with every GPU row, bf16-mixed on CPU autocast
#
# PYTHON picks the interpreter (default: the repository's .venv); GPU_CHECK_LIMIT_S the hard time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [[ " $* " != *" --cpu "* ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec timeout "${GPU_CHECK_LIMIT_S:-600}" "$PYTHON" benchmarks/gpu_check.py "$@"
