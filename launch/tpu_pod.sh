#!/usr/bin/env bash
# Run an attnlab config on every worker of a Cloud TPU VM pod slice.
#
#   TPU=my-v5e-64 ZONE=us-west4-a bash launch/tpu_pod.sh \
#       --config=configs/softmax_1b.py --workdir=gs://BUCKET/runs/softmax_1b
#
# Copies this checkout to every worker, installs it with jax[tpu] in a venv on
# first use, and starts training in tmux on all workers with --distributed
# (jax.distributed.initialize() finds the pod topology by itself).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
repo=$(cd "$(dirname "$0")/.." && pwd)
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
gcloud compute tpus tpu-vm scp --recurse "$repo" "$TPU":~/attnlab --zone="$ZONE" --worker=all
ssh_all "test -d ~/venv || (python3 -m venv ~/venv && ~/venv/bin/pip install -q -e ~/attnlab 'jax[tpu]==0.10.2')"
args=$(printf ' %q' "$@")
ssh_all "tmux new -d -s attnlab 'cd ~/attnlab && ~/venv/bin/python -m attnlab.train --distributed$args 2>&1 | tee ~/attnlab_\$(hostname).log'"
echo "started; follow with: gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=0 --command='tail -f ~/attnlab_*.log'"
