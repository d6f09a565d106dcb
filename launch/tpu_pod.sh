#!/usr/bin/env bash
# One-shot: set up an existing TPU VM slice and start a run on every worker
# (launch/tpu.sh setup, then launch/tpu.sh run). See launch/tpu.sh for the rest
# (create, logs, collect, stop, delete) and the environment it reads.
#
#   TPU=my-v5e-64 ZONE=us-west4-a bash launch/tpu_pod.sh [--dry-run] \
#       --config=configs/softmax_1b.py --workdir=gs://BUCKET/runs/softmax_1b
set -euo pipefail
here=$(dirname "$0")
dry=()
if [[ ${1:-} == --dry-run ]]; then
  dry=(--dry-run)
  shift
fi
bash "$here/tpu.sh" "${dry[@]}" setup
bash "$here/tpu.sh" "${dry[@]}" run "$@"
