#!/usr/bin/env bash
# Two JAX processes on this machine (4 simulated CPU devices each, gloo
# collectives over 127.0.0.1): a real multi-process run without a cluster.
#
#   bash launch/multiprocess_cpu.sh --config=configs/tiny.py --workdir=runs/tiny_2proc
set -euo pipefail
port=${PORT:-12355}
export XLA_FLAGS=--xla_force_host_platform_device_count=4
pids=()
for i in 0 1; do
  python -m attnlab.train --coordinator_address="127.0.0.1:$port" --num_processes=2 \
      --process_id=$i "$@" --config.mesh.data=-1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
