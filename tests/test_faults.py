"""Faults during a run: the disk fills, files vanish, SIGTERM comes twice.

Each fault is injected at a known step, and the test checks what a user would
look for afterwards: a clear message, a complete newest checkpoint, a run that
went on (or resumes to the same losses).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from attnlab import checkpoint, metrics, trainer

from .conftest import REPO, assert_same_losses, checkpoint_entries, metric_rows, tiny_config

_TOTAL = 30
_FLAGS = [
  f"--config=configs/tiny.py:steps={_TOTAL}",
  "--config.data.batch_size=8",
  "--config.data.eval_batch_size=8",
  "--config.data.seq_len=32",
  "--config.data.num_kv_pairs=4",
  "--config.log_every=1",
  "--config.eval_every=0",
  "--config.checkpoint_every=10",
  "--config.progress=False",
]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _train(workdir, *extra):
  return subprocess.run(
    [sys.executable, "-m", "attnlab.train", f"--workdir={workdir}", *_FLAGS, *extra],
    cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
  )  # fmt: skip


def _steps_on_disk(workdir) -> list[str]:
  return checkpoint_entries(workdir)


@pytest.fixture
def small_disk(tmp_path):
  """mount(size_kib) puts a tmpfs of that size at tmp_path/disk (root only);
  resize(size_kib) changes it in place."""
  mountpoint = tmp_path / "disk"
  mountpoint.mkdir()
  mounted = []

  def mount(size_kib: int):
    probe = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mountpoint)],
      capture_output=True, text=True,
    )  # fmt: skip
    if probe.returncode != 0:
      pytest.skip(f"cannot mount a small tmpfs here (needs root): {probe.stderr.strip()}")
    mounted.append(mountpoint)
    return mountpoint

  def resize(size_kib: int):
    subprocess.run(
      ["mount", "-o", f"remount,size={size_kib}k", str(mountpoint)], check=True, capture_output=True
    )

  mount.resize = resize
  yield mount
  for point in mounted:
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.slow
def test_disk_full_at_a_save_stops_cleanly_and_resumes_to_the_same_losses(tmp_path, small_disk):
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root")
  reference = tmp_path / "reference"
  done = _train(reference)
  assert done.returncode == 0, done.stderr[-3000:]
  one_checkpoint = sum(
    f.stat().st_size for f in (reference / "checkpoints" / "10").rglob("*") if f.is_file()
  )
  # Room for the run's files and one checkpoint, not two: the save at step 20 cannot fit.
  disk = small_disk(int(1.5 * one_checkpoint / 1024) + 64)
  workdir = disk / "w"

  full = _train(workdir)
  assert full.returncode == 1, full.stderr[-3000:]
  last = full.stderr.strip().splitlines()[-1]
  assert last.startswith(
    "attnlab.train: error: DiskFullError: no space for the checkpoint at step 20"
  )
  assert "the newest complete checkpoint is step 10" in last
  assert "Traceback" not in full.stderr
  assert _steps_on_disk(workdir) == ["10"]  # complete, and nothing half-written beside it
  assert max(r["step"] for r in metric_rows(workdir)) == 20

  small_disk.resize(8 * 1024)  # space freed
  resumed = _train(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert _steps_on_disk(workdir) == ["10", "20", "30"]
  assert_same_losses(reference, workdir, range(11, _TOTAL + 1), rtol=1e-6)


def test_a_write_that_runs_out_of_space_is_removed_and_named(tmp_path):
  """The reactive path: space taken by someone else after the check."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  try:
    partial = os.path.join(ckpt.directory, "20.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(partial, "state"))
    error = ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")
    translated = ckpt._translated(error, 20)
    assert isinstance(translated, checkpoint.DiskFullError)
    assert "filled up while writing the checkpoint at step 20" in str(translated)
    assert not os.path.exists(partial)
    other = RuntimeError("something else")
    assert ckpt._translated(other, 20) is other
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def vanishing_files_run(tmp_path_factory):
  """A 30-step run (checkpoints every 10) whose checkpoint directory is deleted
  at step 15 and whose metrics.jsonl is deleted at step 22, from inside the
  metrics writer so the steps are exact. Returns (workdir, warnings)."""
  workdir = str(tmp_path_factory.mktemp("vanishing") / "w")
  warnings = []
  original_write, original_warning = metrics.MetricWriter.write, metrics.MetricWriter.warning

  def write(self, step, values):
    if step == 15:  # step 10's async save may still be writing: delete whatever is there
      for _ in range(100):
        try:
          shutil.rmtree(os.path.join(workdir, "checkpoints"))
          break
        except OSError:  # a file appeared while deleting
          time.sleep(0.02)
    if step == 22:
      os.remove(os.path.join(workdir, "metrics.jsonl"))
    original_write(self, step, values)

  def warning(self, text):
    warnings.append(text)
    original_warning(self, text)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(metrics.MetricWriter, "write", write)
    patch.setattr(metrics.MetricWriter, "warning", warning)
    config = tiny_config(total_steps=_TOTAL, checkpoint_every=10, eval_every=0, log_every=1)
    trainer.train_and_evaluate(config, workdir)
  return workdir, warnings


def test_checkpoint_directory_deleted_mid_run_keeps_training(vanishing_files_run):
  workdir, warnings = vanishing_files_run
  assert _steps_on_disk(workdir) == ["20", "30"]
  vanished = [w for w in warnings if "disappeared during the run" in w]
  assert len(vanished) == 1 and "recreated it at step 20" in vanished[0]
  ckpt = checkpoint.Checkpointer(workdir, keep=3)
  try:
    assert ckpt.latest_step() == _TOTAL
  finally:
    ckpt.close()


def test_metrics_file_removed_mid_run_is_recreated(vanishing_files_run):
  workdir, warnings = vanishing_files_run
  assert [r["step"] for r in metric_rows(workdir)] == list(range(22, _TOTAL + 1))
  recreated = [w for w in warnings if "metrics.jsonl was removed" in w]
  assert len(recreated) == 1 and "recreated it at step 22" in recreated[0]


def _read_until(stream, needle: str, deadline: float) -> str:
  seen = ""
  while time.time() < deadline:
    ready, _, _ = select.select([stream], [], [], 0.5)
    if ready:
      line = stream.readline()
      if not line:
        break
      seen += line
      if needle in line:
        return seen
  raise AssertionError(f"never saw {needle!r}; stderr so far:\n{seen[-3000:]}")


@pytest.mark.slow
def test_sigterm_twice_finishes_the_checkpoint(tmp_path):
  """The second SIGTERM arrives while the first one's checkpoint is being
  written: the process finishes that save and exits 0, leaving one complete
  checkpoint and nothing half-written."""
  workdir = tmp_path / "w"
  command = [
    sys.executable, "-m", "attnlab.train", f"--workdir={workdir}", "--config=configs/tiny.py",
    "--config.total_steps=100000", "--config.checkpoint_every=0", "--config.eval_every=0",
    "--config.log_every=5", "--config.progress=True",
  ]  # fmt: skip
  proc = subprocess.Popen(
    command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  try:
    deadline = time.time() + 300
    _read_until(proc.stderr, "step 10/", deadline)  # training, compiled
    proc.send_signal(signal.SIGTERM)
    _read_until(proc.stderr, "SIGTERM: saved a checkpoint at step", deadline)
    proc.send_signal(signal.SIGTERM)  # the save is in flight: the loop has left
    rest = proc.stderr.read()
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, rest[-3000:]
  assert "SIGTERM again: finishing the checkpoint first" in rest
  steps = _steps_on_disk(workdir)
  assert len(steps) == 1 and steps[0].isdigit(), steps  # finalised, no temporary directory
  assert not (workdir / "checkpoints_damaged").exists()
  ckpt = checkpoint.Checkpointer(str(workdir), keep=3)
  try:
    assert ckpt.latest_step() == int(steps[0])
  finally:
    ckpt.close()


def test_a_checkpoint_directory_made_again_counts_as_vanished(tmp_path):
  """Deleted and made again (as an in-flight save does), the directory may get the old
  inode number back; the run's token still tells it is not the directory it made."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  try:
    assert not ckpt._vanished()
    shutil.rmtree(ckpt.directory)
    os.makedirs(ckpt.directory)
    assert ckpt._vanished()
  finally:
    ckpt.close()
