#!/usr/bin/env bash
# The GPU rows of the benchmark (issue 9), as one prepared run on a lent GPU machine:
#   scripts/gpu_wheels.sh                      # here, once: the wheels the machine lacks
#   run(command="bash scripts/gpu_bench.sh", carry=[".gpu_wheels"], timeout_s=540)
# It needs only `python3` (or `python`) with torch and torchvision; each missing one is named in one line
# (exit 3), and a machine without CUDA says so in one line (exit 4). The packages the platform needs beyond
# those are installed from the carried wheels (no index) into a venv with --system-site-packages, because a
# PEP 668 ("externally managed") system Python refuses `pip install`; where no venv can be made, pip is
# told to break the system packages (PIP_BREAK_SYSTEM_PACKAGES). Then it runs train (resnet50 224 px batch
# 64: the platform's loop against a bare loop, bf16 + channels_last against strict fp32, images/s, AdamP's
# step, a checkpoint save), eval and packing on CUDA, and data (the trial's loader at the worker count of
# resources.cpu 2, 4 and 9), and writes reports/performance_gpu.md into $OUT (or reports/ when unset).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "gpu_bench: $*" >&2; }
py=$(command -v python3 || command -v python || true)
[ -n "$py" ] || { say "no python3 or python on PATH"; exit 3; }
for module in torch torchvision; do
  "$py" -c "import $module" 2>/dev/null || { say "$module missing: $py cannot import it; use a Python with PyTorch and torchvision"; exit 3; }
done
missing=$("$py" -c '
import importlib.util
wanted = {"pydantic": "pydantic", "adamp": "adamp", "filelock": "filelock", "tqdm": "tqdm", "yaml": "pyyaml",
          "numpy": "numpy", "PIL": "pillow"}
print(" ".join(dist for module, dist in wanted.items() if importlib.util.find_spec(module) is None))')
if [ -n "$missing" ]; then
  wheels="${GPU_WHEELS:-.gpu_wheels}"
  [ -d "$wheels" ] || { say "missing $missing and no $wheels/: run scripts/gpu_wheels.sh here and carry .gpu_wheels"; exit 3; }
  venv="${GPU_VENV:-${TMPDIR:-/tmp}/tune_upl_gpu_venv}"
  if "$py" -m venv --system-site-packages "$venv" >/dev/null 2>&1; then
    py="$venv/bin/python"
  else
    export PIP_BREAK_SYSTEM_PACKAGES=1
  fi
  "$py" -m pip install --quiet --no-index --find-links "$wheels" $missing
fi
"$py" -c '
import sys, torch
if not torch.cuda.is_available():
    print(f"gpu_bench: no CUDA: torch {torch.__version__} of {sys.executable} sees no GPU; nothing measured",
          file=sys.stderr)
    sys.exit(4)' || exit $?
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out="${OUT:-reports}/performance_gpu.md"
quick="${GPU_BENCH_QUICK:+--quick}"
"$py" -m benchmarks --suite train,eval,packing,data --device cuda --trial_cpus 2,4,9 $quick --out "$out" \
  --preamble "Measured on a lent GPU machine with scripts/gpu_bench.sh (one prepared run)."
