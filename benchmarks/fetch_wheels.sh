#!/usr/bin/env bash
# Wheels for the GPU baselines, downloaded here and carried to a device machine that has no
# package index (its image: Python 3.12, jax 0.11.x with CUDA, torch, flax). gpu_check.sh
# installs .wheels/*.whl with --no-deps first; a baseline whose wheels are missing is left
# out of the tables, not failed.
#   tokamax (Triton and Mosaic GPU attention; 0.0.12 is the newest the index serves) with its
#     pure-Python dependencies and pydantic's compiled core for CPython 3.12;
#   fla (flash-linear-attention: chunk Gated DeltaNet in Triton).
#
#   bash benchmarks/fetch_wheels.sh      # then carry .wheels in the device call
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .wheels
get() {  # get [--no-deps] REQUIREMENT...
  python3 -m pip download -q --dest .wheels --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    --only-binary=:all: "$@" || echo "fetch_wheels: could not download $*" >&2
}
get --no-deps tokamax==0.0.12 einshape jaxtyping wadler_lindig qwix
get pydantic  # with its dependencies: pydantic pins the pydantic-core it was built with
get --no-deps fla-core flash-linear-attention
ls -1 .wheels
