#!/usr/bin/env bash
# Submit an attnlab run to a SLURM GPU cluster: one process per GPU (default)
# or one per node, each calling jax.distributed.initialize() with the same
# command line.
#
#   bash launch/slurm.sh [--dry-run] [--nodes=2] [--gpus-per-node=8] [--per-node] \
#       [--partition=P] [--time=24:00:00] [--account=A] -- \
#       --config=configs/softmax_1b.py --workdir=/shared/runs/softmax_1b
#
# --dry-run prints the sbatch command and the srun command each job step runs.
# The workdir must be on a file system every node sees (orbax writes each
# process's shards into it). PYTHON (default: python) is the interpreter with
# attnlab and jax[cuda] installed on the nodes.
#
# Per GPU (default): N·G tasks; jax.distributed.initialize() reads SLURM's
# variables itself (--distributed) and takes GPU SLURM_LOCALID, so every task
# must see all of its node's GPUs (no --gpus-per-task binding).
# Per node: N tasks. JAX would still pin each task to GPU SLURM_LOCALID (= 0),
# so launch/slurm_job.sh hides SLURM_JOB_ID from it and passes the coordinator,
# process count and id explicitly; each process then drives all its node's GPUs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dry=0 nodes=1 gpus=8 mode=gpu sbatch_extra=()
while (($#)); do
  case $1 in
    --dry-run) dry=1 ;;
    --nodes=*) nodes=${1#*=} ;;
    --gpus-per-node=*) gpus=${1#*=} ;;
    --per-node) mode=node ;;
    --partition=* | --time=* | --account=* | --qos=* | --job-name=*) sbatch_extra+=("$1") ;;
    --) shift; break ;;
    *) echo "launch/slurm.sh: unknown option $1 (train arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
if (($# == 0)); then
  echo "launch/slurm.sh: give the train arguments after --" >&2
  exit 2
fi
tasks=$gpus
if [[ $mode == node ]]; then tasks=1; fi
cmd=(sbatch --nodes="$nodes" --ntasks-per-node="$tasks" --gpus-per-node="$gpus"
  "${sbatch_extra[@]}" "$here/slurm_job.sh" "$mode" "$@")
if ((dry)); then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  echo "# each job step then runs:"
  SLURM_DRY_RUN=1 SLURM_JOB_ID=${SLURM_JOB_ID:-12345} SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-node[001-002]} \
    bash "$here/slurm_job.sh" "$mode" "$@"
else
  "${cmd[@]}"
fi
