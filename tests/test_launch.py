"""launch/: every script's --dry-run prints the exact commands (checked here);
shellcheck lints them when it is installed."""

import os
import shlex
import shutil
import subprocess

import pytest

from .conftest import REPO

SCRIPTS = ["tpu.sh", "tpu_pod.sh", "slurm.sh", "slurm_job.sh", "multiprocess_cpu.sh"]
TPU_ENV = {"TPU": "node-1", "ZONE": "us-west4-a", "TYPE": "v5litepod-16", "PROJECT": "proj"}


def _dry(script, *args, **env):
  out = subprocess.run(
    ["bash", str(REPO / "launch" / script), *args],
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]


def _remote(line):
  """The --command=... a gcloud ssh line runs on the workers."""
  return next(a.split("=", 1)[1] for a in line if a.startswith("--command="))


def test_tpu_create_and_delete():
  create, describe = _dry("tpu.sh", "--dry-run", "create", **TPU_ENV, SPOT="1")
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert create[5] == "node-1-qr"
  assert {
    "--node-id=node-1",
    "--accelerator-type=v5litepod-16",
    "--zone=us-west4-a",
    "--project=proj",
    "--spot",
  } <= set(create)
  assert describe[4] == "describe" and "--format=value(state.state)" in describe
  (delete,) = _dry("tpu.sh", "--dry-run", "delete", **TPU_ENV)
  assert delete[3:6] == ["queued-resources", "delete", "node-1-qr"] and "--force" in delete
  (delete_vm,) = _dry("tpu.sh", "--dry-run", "delete", **TPU_ENV, EXISTING="1")
  assert delete_vm[3:6] == ["tpu-vm", "delete", "node-1"]


def test_tpu_setup_copies_only_the_package():
  archive, scp, install, mount, data = _dry(
    "tpu.sh", "--dry-run", "setup", **TPU_ENV, BUCKET="bkt", DATA="gs://bkt/tfds"
  )
  assert archive[:3] == ["git", "-C", str(REPO)] and archive[3] == "archive"
  assert archive[-5:] == ["attnlab", "configs", "sweeps", "pyproject.toml", "README.md"]
  assert "HEAD" in archive  # tracked files only: no runs/, .git, venvs
  assert scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp
  assert "pip install -q -e ~/attnlab 'jax[tpu]==0.10.2'" in _remote(install)
  assert "gcsfuse --implicit-dirs bkt ~/gcs/bkt" in _remote(mount)
  assert "gcloud storage rsync -r gs://bkt/tfds ~/tensorflow_datasets" in _remote(data)


def test_tpu_run_logs_collect_stop():
  start, wait = _dry(
    "tpu.sh",
    "--dry-run",
    "run",
    "--config=configs/tiny.py:attention=linear",
    "--workdir=gs://bkt/runs/a b",
    "--wait",
    **TPU_ENV,
    BUCKET="bkt",
  )
  assert "--worker=all" in start
  remote = _remote(start)
  # The worker's shell runs tmux with the train command in single quotes.
  tmux = shlex.split(remote.split("; ", 1)[1])
  assert tmux[:5] == ["tmux", "new-session", "-d", "-s", "attnlab"]
  train = shlex.split(tmux[5])
  assert train[train.index("-m") + 1 :][:4] == [
    "attnlab.train",
    "--distributed",
    "--config=configs/tiny.py:attention=linear",
    "--workdir=$HOME/gcs/bkt/runs/a b",  # gs:// of the mounted bucket -> its mount
  ]
  assert "--worker=0" in wait and "tmux has-session" in _remote(wait)
  (logs,) = _dry("tpu.sh", "--dry-run", "logs", **TPU_ENV)
  assert _remote(logs) == "tail -n 20 ~/attnlab.*.log"
  mkdir, collect = _dry("tpu.sh", "--dry-run", "collect", "out", **TPU_ENV)
  assert mkdir == ["mkdir", "-p", "out"] and collect[5:7] == ["node-1:~/attnlab.*.log", "out/"]
  (stop,) = _dry("tpu.sh", "--dry-run", "stop", **TPU_ENV)
  assert "kill -TERM $(cat ~/attnlab.pid)" in _remote(stop)


def test_tpu_pod_is_setup_then_run():
  lines = _dry("tpu_pod.sh", "--dry-run", "--config=configs/tiny.py", "--workdir=/tmp/w", **TPU_ENV)
  assert lines[0][3] == "archive" and "tmux new-session" in _remote(lines[-1])


def test_slurm_per_gpu_and_per_node():
  args = ["--config=configs/tiny.py", "--workdir=/shared/w"]
  sbatch, srun = _dry(
    "slurm.sh",
    "--dry-run",
    "--nodes=2",
    "--gpus-per-node=4",
    "--partition=p",
    "--",
    *args,
    SLURM_JOB_ID="100",
    SLURM_JOB_NODELIST="gpu[07-08]",
  )
  assert sbatch[:5] == [
    "sbatch",
    "--nodes=2",
    "--ntasks-per-node=4",
    "--gpus-per-node=4",
    "--partition=p",
  ]
  assert sbatch[5].endswith("launch/slurm_job.sh") and sbatch[6:] == ["gpu", *args]
  assert srun[1:] == [
    "--kill-on-bad-exit=1",
    "python",
    "-m",
    "attnlab.train",
    "--distributed",
    *args,
  ]
  sbatch, srun = _dry(
    "slurm.sh",
    "--dry-run",
    "--nodes=2",
    "--per-node",
    "--",
    *args,
    SLURM_JOB_ID="100",
    SLURM_JOB_NODELIST="gpu[07-08]",
  )
  assert "--ntasks-per-node=1" in sbatch and sbatch[-3] == "node"
  inner = shlex.split(srun[-1])
  # JAX's own port rule (job id mod 4096 above 61440) on the first node.
  assert inner[:6] == ["exec", "env", "-u", "SLURM_JOB_ID", "python", "-m"]
  assert inner[7:] == [
    "--coordinator_address=gpu07:61540",
    "--num_processes=$SLURM_NTASKS",
    "--process_id=$SLURM_PROCID",
    *args,
  ]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
  out = subprocess.run(
    ["shellcheck", *(str(REPO / "launch" / s) for s in SCRIPTS)], capture_output=True, text=True
  )
  assert out.returncode == 0, out.stdout
