#!/usr/bin/env bash
# attnlab on a Cloud TPU VM slice: create, set up, run on every worker, watch, stop, delete.
#
#   export TPU=my-v5e-16 ZONE=us-west4-a TYPE=v5litepod-16 RUNTIME=v2-alpha-tpuv5-lite
#   bash launch/tpu.sh create                      # queued resource; waits until ACTIVE
#   bash launch/tpu.sh setup                       # copy the package, venv, install
#   bash launch/tpu.sh run --config=configs/softmax_1b.py --workdir=gs://BUCKET/runs/softmax_1b
#   bash launch/tpu.sh logs                        # last lines of every worker's log
#   bash launch/tpu.sh collect logs/               # copy every worker's log here
#   bash launch/tpu.sh stop                        # SIGTERM: checkpoint and exit
#   bash launch/tpu.sh delete                      # delete the queued resource / VM
#
# Every command takes --dry-run (first) and then prints the exact commands
# instead of running them: bash launch/tpu.sh --dry-run run --config=...
#
# Environment:
#   TPU      TPU VM (node) name                    (required)
#   ZONE     zone                                  (required)
#   PROJECT  gcloud project (default: gcloud's)
#   TYPE     accelerator type, e.g. v5litepod-16   (create)
#   RUNTIME  TPU software version                  (create; default v2-alpha-tpuv5-lite)
#   QR       queued-resource name (default: $TPU-qr); EXISTING=1: use an existing
#            TPU VM, never create or delete a queued resource (delete removes the VM)
#   SPOT=1   spot capacity (create)
#   BUCKET   a GCS bucket mounted with gcsfuse at ~/gcs/$BUCKET on every worker (setup);
#            run rewrites --workdir=gs://$BUCKET/... to that mount, because the
#            trainer writes its metrics and config with plain file I/O
#   DATA     gs:// TFDS data_dir copied to ~/tensorflow_datasets on every worker
#            (setup): ArrayRecord's reader opens local files only (google/array_record#120);
#            then pass --config.data.data_dir=/home/$USER/tensorflow_datasets
#   RUN      name of the run's tmux session and log (default attnlab)
#
# Only the package travels (git archive of HEAD: attnlab/, configs/, sweeps/,
# pyproject.toml, README.md), never runs/, .git or venvs; commit first.
set -euo pipefail

DRY=0
if [[ ${1:-} == --dry-run ]]; then
  DRY=1
  shift
fi
cmd=${1:-help}
shift || true

repo=$(cd "$(dirname "$0")/.." && pwd)
RUN=${RUN:-attnlab}
QR=${QR:-${TPU:-tpu}-qr}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
JAX_PIN='jax[tpu]==0.10.2'

# Runs a command, or prints it (shell-quoted) under --dry-run.
x() {
  if ((DRY)); then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

need() {
  local v
  for v in "$@"; do
    if [[ -z ${!v:-} ]]; then
      echo "launch/tpu.sh: set $v" >&2
      exit 2
    fi
  done
}

gc_flags() {
  printf '%s\n' "--zone=$ZONE"
  if [[ -n ${PROJECT:-} ]]; then printf '%s\n' "--project=$PROJECT"; fi
}

ssh_all() {
  local flags
  mapfile -t flags < <(gc_flags)
  x gcloud compute tpus tpu-vm ssh "$TPU" "${flags[@]}" --worker=all --command="$1"
}

create() {
  need TPU ZONE TYPE
  local flags spot=()
  mapfile -t flags < <(gc_flags)
  if [[ ${SPOT:-0} == 1 ]]; then spot=(--spot); fi
  x gcloud compute tpus queued-resources create "$QR" "${flags[@]}" --node-id="$TPU" \
    --accelerator-type="$TYPE" --runtime-version="$RUNTIME" "${spot[@]}"
  if ((DRY)); then
    echo "# then poll until ACTIVE:"
    x gcloud compute tpus queued-resources describe "$QR" "${flags[@]}" --format='value(state.state)'
    return
  fi
  local state=""
  until [[ $state == ACTIVE ]]; do
    sleep 30
    state=$(gcloud compute tpus queued-resources describe "$QR" "${flags[@]}" \
      --format='value(state.state)')
    echo "queued resource $QR: $state"
    if [[ $state == FAILED || $state == SUSPENDED ]]; then exit 1; fi
  done
}

setup() {
  need TPU ZONE
  local flags archive=/tmp/attnlab_package.tar.gz
  mapfile -t flags < <(gc_flags)
  x git -C "$repo" archive --format=tar.gz -o "$archive" HEAD \
    attnlab configs sweeps pyproject.toml README.md
  x gcloud compute tpus tpu-vm scp "$archive" "$TPU":attnlab_package.tar.gz "${flags[@]}" --worker=all
  ssh_all "rm -rf ~/attnlab && mkdir -p ~/attnlab && tar -xzf ~/attnlab_package.tar.gz -C ~/attnlab \
&& (test -d ~/venv || python3 -m venv ~/venv) \
&& ~/venv/bin/pip install -q -e ~/attnlab '$JAX_PIN'"
  if [[ -n ${BUCKET:-} ]]; then
    ssh_all "command -v gcsfuse >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q gcsfuse); \
mkdir -p ~/gcs/$BUCKET && (mountpoint -q ~/gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET ~/gcs/$BUCKET)"
  fi
  if [[ -n ${DATA:-} ]]; then
    ssh_all "mkdir -p ~/tensorflow_datasets && gcloud storage rsync -r $DATA ~/tensorflow_datasets"
  fi
}

run() {
  need TPU ZONE
  local wait=0 args=() a
  for a in "$@"; do
    if [[ $a == --wait ]]; then
      wait=1
    elif [[ -n ${BUCKET:-} && $a == --workdir=gs://$BUCKET/* ]]; then
      args+=("--workdir=\$HOME/gcs/$BUCKET/$(printf '%q' "${a#--workdir=gs://"$BUCKET"/}")")
    else
      args+=("$(printf '%q' "$a")")
    fi
  done
  # One tmux session per worker; the pid file lets `stop` send SIGTERM to
  # the trainer itself (it checkpoints and exits), the log names the worker.
  # Single quotes on the worker: tmux's own shell expands $$ and $(hostname).
  local train="cd ~/attnlab && echo \$\$ > ~/$RUN.pid && exec ~/venv/bin/python -m attnlab.train \
--distributed ${args[*]} > ~/$RUN.\$(hostname).log 2>&1"
  ssh_all "tmux kill-session -t $RUN 2>/dev/null; tmux new-session -d -s $RUN '$train'"
  if ((wait)); then
    local flags
    mapfile -t flags < <(gc_flags)
    if ((DRY)); then
      echo "# then wait while worker 0's session lives:"
    fi
    while x gcloud compute tpus tpu-vm ssh "$TPU" "${flags[@]}" --worker=0 \
      --command="tmux has-session -t $RUN 2>/dev/null"; do
      if ((DRY)); then break; fi
      sleep 60
    done
  fi
}

logs() {
  need TPU ZONE
  ssh_all "tail -n ${LOG_LINES:-20} ~/$RUN.*.log"
}

collect() {
  need TPU ZONE
  local out=${1:-logs} flags
  mapfile -t flags < <(gc_flags)
  x mkdir -p "$out"
  # Each worker's log carries its hostname, so copies from all workers don't collide.
  x gcloud compute tpus tpu-vm scp "$TPU:~/$RUN.*.log" "$out/" "${flags[@]}" --worker=all
}

stop() {
  need TPU ZONE
  ssh_all "test -f ~/$RUN.pid && kill -TERM \$(cat ~/$RUN.pid) 2>/dev/null; rm -f ~/$RUN.pid; true"
}

delete() {
  need TPU ZONE
  local flags
  mapfile -t flags < <(gc_flags)
  if [[ ${EXISTING:-0} == 1 ]]; then
    x gcloud compute tpus tpu-vm delete "$TPU" "${flags[@]}" --quiet
  else
    x gcloud compute tpus queued-resources delete "$QR" "${flags[@]}" --force --quiet
  fi
}

case $cmd in
  create) create ;;
  setup) setup ;;
  run) run "$@" ;;
  logs) logs ;;
  collect) collect "$@" ;;
  stop) stop ;;
  delete) delete ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    [[ $cmd == help ]]
    ;;
esac
