"""Damaged checkpoints and exact resume.

A damaged latest checkpoint (files removed or truncated, or an unfinished
async save left by a killed process) makes the next start restore the newest
complete one, warn naming what it skipped and move it aside; earlier
checkpoints stay. A real `python -m attnlab.train` killed with SIGKILL while
saving resumes to the same per-step losses as an uninterrupted run.
"""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import attnlab.data
from attnlab import checkpoint, train_state, trainer

from .conftest import (
  REPO,
  TINY_RUN_FLAGS,
  assert_same_losses,
  checkpoint_entries,
  free_port,
  metric_rows,
  tiny_config,
)

pytestmark = pytest.mark.slow

_STEPS = 3


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A tiny run checkpointed at every step: checkpoints/1, 2, 3."""
  workdir = str(tmp_path_factory.mktemp("ckpt") / "run")
  config = tiny_config(total_steps=_STEPS, checkpoint_every=1, keep_checkpoints=5, eval_every=0)
  trainer.train_and_evaluate(config, workdir)
  return config, workdir


def _restore(config, workdir):
  """Checkpointer.restore_latest as the trainer calls it, on one device.

  Returns (step, state, next train batch, the Checkpointer)."""
  _, init, _ = train_state.initializer(config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(init, jax.random.key(0))
  abstract = checkpoint.abstract_with_sharding(abstract, jax.tree.map(lambda _: device, abstract))
  data = iter(attnlab.data.make_dataset(config.data, seed=config.seed, train=True))
  ckpt = checkpoint.Checkpointer(workdir, keep=5)
  try:
    step, state = ckpt.restore_latest(abstract, data)
  finally:
    ckpt.close()
  return step, state, next(data), ckpt


def _batch_after(config, steps):
  data = iter(attnlab.data.make_dataset(config.data, seed=config.seed, train=True))
  for _ in range(steps):
    next(data)
  return next(data)


def _files(directory):
  return sorted(
    os.path.join(root, f) for root, _, names in os.walk(directory) for f in names
  )  # fmt: skip


def _largest_state_file(step_dir):
  files = [f for f in _files(os.path.join(step_dir, "state")) if os.path.getsize(f) > 0]
  return max(files, key=os.path.getsize)


def _remove_state_data(step_dir):
  os.remove(_largest_state_file(step_dir))


def _truncate_state_data(step_dir):
  path = _largest_state_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _remove_data_iterator_state(step_dir):
  for f in _files(os.path.join(step_dir, "data")):
    os.remove(f)


def _remove_state_metadata(step_dir):
  for f in _files(os.path.join(step_dir, "state")):
    if "metadata" in os.path.basename(f):
      os.remove(f)


def _unfinished_save(step_dir):
  """What SIGKILL during orbax's async save leaves: the temporary directory."""
  os.rename(step_dir, step_dir + ".orbax-checkpoint-tmp-1764543210123")


DAMAGE = {
  "remove_state_data": _remove_state_data,
  "truncate_state_data": _truncate_state_data,
  "remove_data_iterator_state": _remove_data_iterator_state,
  "unfinished_save": _unfinished_save,
}


@pytest.fixture
def absl_warnings(caplog):
  caplog.set_level(logging.WARNING, logger="absl")
  return caplog


def test_undamaged_restore_gives_the_last_step_and_data_position(saved_run, tmp_path):
  config, workdir = saved_run
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  step, state, batch, ckpt = _restore(config, copy)
  assert step == _STEPS and int(state["step"]) == _STEPS and not ckpt.skipped
  np.testing.assert_array_equal(batch["inputs"], _batch_after(config, _STEPS)["inputs"])


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_newest_complete_one(
  saved_run, tmp_path, damage, absl_warnings
):
  config, workdir = saved_run
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  ckpt_dir = os.path.join(copy, "checkpoints")
  DAMAGE[damage](os.path.join(ckpt_dir, str(_STEPS)))

  step, state, batch, ckpt = _restore(config, copy)
  assert step == _STEPS - 1 and int(state["step"]) == _STEPS - 1
  # The data iterator resumes where step 2 left it.
  np.testing.assert_array_equal(batch["inputs"], _batch_after(config, _STEPS - 1)["inputs"])
  # The restored parameters are step 2's own, not a mix with step 3.
  reference = _restore(config, _copy_of(workdir, tmp_path / "ref", drop=(_STEPS,)))[1]
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(reference["params"])):
    np.testing.assert_array_equal(a, b)
  # One warning names the skipped checkpoint; it is moved aside, not deleted.
  [line] = ckpt.skipped
  assert f"checkpoints/{_STEPS}" in line and "checkpoints_damaged" in line
  assert any(line in r.getMessage() for r in absl_warnings.records)
  moved = os.listdir(os.path.join(copy, "checkpoints_damaged"))
  assert len(moved) == 1 and moved[0].startswith(str(_STEPS))
  assert checkpoint_entries(copy) == ["1", "2"]  # nothing earlier lost


def _copy_of(workdir, target, drop=()):
  shutil.copytree(workdir, str(target))
  for step in drop:
    shutil.rmtree(os.path.join(str(target), "checkpoints", str(step)))
  return str(target)


def test_removed_metadata_files_still_restore_the_same_values(saved_run, tmp_path):
  """Orbax restores into the given abstract state without the state's metadata
  files, so their loss is no damage: the same step and values come back."""
  config, workdir = saved_run
  copy = _copy_of(workdir, tmp_path / "run")
  _remove_state_metadata(os.path.join(copy, "checkpoints", "3"))
  step, state, _, ckpt = _restore(config, copy)
  _, clean, _, _ = _restore(config, _copy_of(workdir, tmp_path / "clean"))
  assert step == 3 and not ckpt.skipped
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(clean)):
    np.testing.assert_array_equal(a, b)


def test_two_damaged_checkpoints_fall_back_two_steps(saved_run, tmp_path):
  config, workdir = saved_run
  copy = _copy_of(workdir, tmp_path / "run")
  _truncate_state_data(os.path.join(copy, "checkpoints", "3"))
  _remove_data_iterator_state(os.path.join(copy, "checkpoints", "2"))
  step, _, batch, ckpt = _restore(config, copy)
  assert step == 1 and len(ckpt.skipped) == 2
  np.testing.assert_array_equal(batch["inputs"], _batch_after(config, 1)["inputs"])
  assert checkpoint_entries(copy) == ["1"]


def test_every_checkpoint_failing_raises_and_moves_nothing(saved_run, tmp_path):
  """A changed model (every restore fails) is an error, not damage to skip."""
  config, workdir = saved_run
  copy = _copy_of(workdir, tmp_path / "run")
  bigger = tiny_config(total_steps=_STEPS, **{"model.d_model": 96})
  with pytest.raises(Exception):  # noqa: B017 (orbax's shape-mismatch error type varies)
    _restore(bigger, copy)
  assert checkpoint_entries(copy) == ["1", "2", "3"]
  assert not os.path.exists(os.path.join(copy, "checkpoints_damaged"))


# A real process killed with SIGKILL during an async save ----------------------

_TOTAL = 40
_FLAGS = [
  "--config=configs/tiny.py",
  f"--config.total_steps={_TOTAL}",
  "--config.data.batch_size=8",
  "--config.data.eval_batch_size=8",
  "--config.data.seq_len=32",
  "--config.data.num_kv_pairs=4",
  "--config.log_every=1",
  "--config.eval_every=0",
  "--config.checkpoint_every=1",
  "--config.keep_checkpoints=3",
  "--config.progress=False",
]


def _train_command(workdir):
  return [sys.executable, "-m", "attnlab.train", f"--workdir={workdir}", *_FLAGS]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _kill_during_a_save(workdir):
  """Starts training and SIGKILLs it while a save is in flight (a temporary
  checkpoint directory exists); returns that directory's name."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  proc = subprocess.Popen(
    _train_command(workdir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )  # fmt: skip
  try:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      names = checkpoint_entries(workdir) if os.path.isdir(ckpt_dir) else []
      unfinished = [n for n in names if ".orbax-checkpoint-tmp" in n]
      if unfinished and len(names) >= 3:  # a few complete steps exist
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = [n for n in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp" in n]
        return left[0] if left else None
      time.sleep(0.002)
    return None
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_sigkill_during_an_async_save_resumes_to_the_same_losses(tmp_path):
  reference = str(tmp_path / "reference")
  config = tiny_config(total_steps=_TOTAL, checkpoint_every=0, eval_every=0, log_every=1)
  trainer.train_and_evaluate(config, reference)

  for attempt in range(3):  # the save may land between the poll and the kill
    workdir = str(tmp_path / f"killed{attempt}")
    unfinished = _kill_during_a_save(workdir)
    if unfinished:
      break
  else:
    pytest.fail("never caught a save in flight in 3 attempts")
  complete = sorted(
    int(n) for n in checkpoint_entries(workdir) if n.isdigit()
  )  # fmt: skip
  assert complete and complete[-1] < _TOTAL

  resumed = subprocess.run(
    _train_command(workdir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "skipped checkpoint" in resumed.stderr and unfinished in resumed.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged")) == [unfinished]

  # The rerun resumed after the newest complete checkpoint, not from step 0
  # (which would give the same losses).
  steps = [r["step"] for r in metric_rows(workdir)]
  rerun = steps[complete[-1] - _TOTAL :]
  assert steps.count(1) == 1 and rerun == list(range(complete[-1] + 1, _TOTAL + 1))
  assert_same_losses(reference, workdir, range(1, _TOTAL + 1), rtol=1e-5)


def test_two_process_resume_gives_the_same_losses(tmp_path):
  """Two processes on 127.0.0.1 (gloo): run 6 steps, drop the checkpoints of
  steps 4 and 6, rerun; steps 3-6 are recomputed from step 2's checkpoint and
  data position and give the same losses."""

  flags = [f for f in TINY_RUN_FLAGS if not f.startswith("--config=")]
  command = [sys.executable, "-m", "attnlab.train", "--config=configs/tiny.py:steps=6", *flags]
  workdir = str(tmp_path / "multi")

  def run_two_processes():
    port = free_port()
    env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [
      subprocess.Popen(
        [
          *command,
          f"--workdir={workdir}",
          f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2",
          f"--process_id={i}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )  # fmt: skip
      for i in range(2)
    ]
    try:
      results = [p.communicate(timeout=600) for p in procs]
    finally:
      for p in procs:
        p.kill()
    for p, (_, err) in zip(procs, results):
      assert p.returncode == 0, err[-3000:]

  run_two_processes()
  first = {r["step"]: r["train/loss"] for r in metric_rows(workdir)}
  assert sorted(first) == [1, 2, 3, 4, 5, 6]
  for step in ("4", "6"):
    shutil.rmtree(os.path.join(workdir, "checkpoints", step))
  rows_before = len(metric_rows(workdir))
  run_two_processes()
  again = metric_rows(workdir)[rows_before:]
  assert [r["step"] for r in again] == [3, 4, 5, 6]
  np.testing.assert_allclose(
    [r["train/loss"] for r in again], [first[s] for s in (3, 4, 5, 6)], rtol=1e-5
  )
