#!/usr/bin/env bash
# Download (here, with the package registry) the wheels that the benchmark's GPU suites need on a lent GPU
# machine, which has Python 3.12 and PyTorch but none of pydantic, adamp, filelock, tqdm, PyYAML, and no
# internet (numpy and Pillow too, in case it lacks them): they go to .gpu_wheels/ (git-ignored, about
# 28 MB, under the 64 MiB a device run carries).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_wheels && mkdir .gpu_wheels
python -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu_wheels pydantic pyyaml filelock tqdm numpy pillow
python -m pip wheel --quiet --no-deps -w .gpu_wheels adamp   # published as an sdist only: a pure-Python wheel
ls .gpu_wheels
