#!/usr/bin/env bash
# The GPU rows of the benchmark (issue 9), as one prepared run on a lent GPU machine:
#   scripts/gpu_wheels.sh                      # here, once: the wheels the machine lacks
#   run(command="bash scripts/gpu_bench.sh", carry=[".gpu_wheels"], timeout_s=540)
# It installs the carried wheels (no index), then runs train (resnet50 224 px batch 64: the platform's loop
# against a bare loop, bf16 + channels_last against strict fp32, images/s, AdamP's step), eval and packing
# on CUDA, and writes reports/performance_gpu.md into $OUT (or reports/ when $OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-index --find-links .gpu_wheels pydantic adamp filelock tqdm pyyaml numpy pillow
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out="${OUT:-reports}/performance_gpu.md"
quick="${GPU_BENCH_QUICK:+--quick}"
python -m benchmarks --suite train,eval,packing --device cuda $quick --out "$out" \
  --preamble "Measured on a lent GPU machine with scripts/gpu_bench.sh (one prepared run)."
