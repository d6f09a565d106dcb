#!/usr/bin/env bash
#SBATCH --job-name=attnlab
#SBATCH --output=attnlab-%j.out
#SBATCH --exclusive
# The batch script of launch/slurm.sh (submit through it): `slurm_job.sh MODE TRAIN_ARGS...`,
# MODE = gpu (one process per GPU) or node (one process per node).
# SLURM_DRY_RUN=1 prints the srun command instead of running it.
set -euo pipefail
mode=$1
shift
python=${PYTHON:-python}
if [[ $mode == gpu ]]; then
  # JAX's SLURM detection: coordinator = first node, port from the job id,
  # process id SLURM_PROCID, local GPU SLURM_LOCALID.
  cmd=(srun --kill-on-bad-exit=1 "$python" -m attnlab.train --distributed "$@")
else
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1 || true)
  if [[ -z $head ]]; then # no scontrol (dry runs): the first host of 'pre[001-004,9],other'
    nodelist=$SLURM_JOB_NODELIST
    if [[ $nodelist == *\[* && ${nodelist%%\[*} != *,* ]]; then
      rest=${nodelist#*\[}
      head=${nodelist%%\[*}${rest%%[],-]*}
    else
      head=${nodelist%%,*}
    fi
  fi
  port=$((SLURM_JOB_ID % 4096 + 61440))
  # Single quotes: each task's own shell expands SLURM_PROCID and SLURM_NTASKS.
  args=$(printf ' %q' "$@")
  cmd=(srun --kill-on-bad-exit=1 bash -c "exec env -u SLURM_JOB_ID $python -m attnlab.train \
--coordinator_address=$head:$port --num_processes=\$SLURM_NTASKS --process_id=\$SLURM_PROCID$args")
fi
if [[ ${SLURM_DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
else
  "${cmd[@]}"
fi
