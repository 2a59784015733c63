#!/usr/bin/env bash
# Here, once, with the package registry: the wheels scripts/gpu_check.sh installs on a lent GPU machine
# (Python 3.12, with torch, torchvision, numpy, Pillow, tqdm and filelock, without the packages below), at
# the versions installed here (those the tests passed with), into .gpu_wheels/ (git-ignored; about 3 MB,
# well under the 64 MiB a device run carries with the working tree). Exactly these ten are carried:
# pydantic with what it needs (pydantic-core, annotated-types, typing-inspection, typing-extensions), adamp,
# pretrainedmodels and munch (BN-Inception's package and its dependency), threadpoolctl, timm (the ViTs; it
# imports huggingface_hub and safetensors only where present, and the trials read local files);
# gpu_check.sh installs only those whose module that machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_wheels && mkdir .gpu_wheels
pins() { python -c 'import sys; from importlib.metadata import version; print(" ".join(f"{d}=={version(d)}" for d in sys.argv[1:]))' "$@"; }
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  -d .gpu_wheels $(pins pydantic pydantic-core annotated-types typing-inspection typing-extensions munch threadpoolctl timm)
# published as sdists only: pure-Python wheels built here
python -m pip wheel --quiet --no-deps -w .gpu_wheels $(pins adamp pretrainedmodels)
ls .gpu_wheels
du -sh .gpu_wheels
