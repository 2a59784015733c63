#!/usr/bin/env bash
# The GPU check as one prepared command on a lent GPU machine (benchmarks/gpu_check.py says what it measures):
#   bash scripts/gpu_wheels.sh                      # here, once: the wheels that machine lacks, in .gpu_wheels/
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=600)
# It needs `python3` (or `python`) with torch and torchvision; each missing one is named in one line (exit 3).
# The other packages the trial loop imports are installed, where missing, from the carried wheels into a
# folder put on PYTHONPATH (pip install --target: no venv, the interpreter's own packages untouched).
# It writes gpu.md and gpu.json into $OUT (reports/ when $OUT is unset). Without CUDA it stops with one line
# (exit 4); at the first failing part with one line (exit 1). --cpu: the dry mode (tiny sizes, 2 processes).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "gpu_check: $*" >&2; }
py=$(command -v python3 || command -v python || true)
[ -n "$py" ] || { say "no python3 or python on PATH"; exit 3; }
# which of these modules the interpreter cannot find (found, not imported: importing torch takes seconds)
missing() { "$py" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@"; }
for module in $(missing torch torchvision); do
  say "$module missing: $py cannot import it; use a Python with PyTorch and torchvision"; exit 3
done
# what the trial loop imports beyond torch and torchvision; the carried wheels provide the first ten, each
# wheel named by its module (pydantic and pydantic_core go together: pydantic pins its core's version)
modules="pydantic pydantic_core annotated_types typing_inspection typing_extensions adamp pretrainedmodels munch threadpoolctl timm numpy PIL tqdm filelock yaml"
absent=$(missing $modules)
if [ -n "$absent" ]; then
  wheels="${GPU_WHEELS:-.gpu_wheels}"
  ls "$wheels"/*.whl >/dev/null 2>&1 || { say "missing $absent and no wheels in $wheels/: run scripts/gpu_wheels.sh here and carry .gpu_wheels"; exit 3; }
  wanted=" $absent "
  case "$wanted" in *" pydantic "*|*" pydantic_core "*) wanted="$wanted pydantic pydantic_core ";; esac
  files=()
  for module in $wanted; do
    for wheel in "$wheels/$module"-*.whl; do [ -f "$wheel" ] && files+=("$wheel"); done
  done
  [ ${#files[@]} -gt 0 ] || { say "missing $absent, which the wheels in $wheels/ do not provide"; exit 3; }
  site="${GPU_SITE:-${TMPDIR:-/tmp}/tune_upl_gpu_site}"
  # only what is missing: a carried wheel must not hide the machine's own copy of a package it has
  "$py" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$site" $(printf '%s\n' "${files[@]}" | sort -u)
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  absent=$(missing $modules)
  [ -z "$absent" ] || { say "missing $absent, which the wheels in $wheels/ do not provide"; exit 3; }
fi
exec "$py" -m benchmarks.gpu_check --out "${OUT:-reports}/gpu.md" "$@"
