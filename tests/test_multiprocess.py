"""A real multi-process run: two processes on 127.0.0.1 joined by
jax.distributed (gloo collectives on CPU), one device each, against the same
run in one process with two devices."""

import os
import subprocess
import sys

import numpy as np
import pytest

import attnlab.data

from .conftest import REPO, TINY_RUN_FLAGS, checkpoint_entries, free_port, load_config, metric_rows

pytestmark = pytest.mark.slow


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def test_synthetic_batches_do_not_depend_on_the_process_count():
  data = load_config("tiny").data
  whole = next(iter(attnlab.data.make_dataset(data, seed=3, train=True)))
  parts = [
    next(
      iter(attnlab.data.make_dataset(data, seed=3, train=True, process_index=i, process_count=4))
    )
    for i in range(4)
  ]
  for key, value in whole.items():
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
  assert not np.array_equal(parts[0]["inputs"], parts[1]["inputs"])


def test_two_processes_on_loopback_match_one_process(tmp_path):
  train = [sys.executable, "-m", "attnlab.train", *TINY_RUN_FLAGS]
  single = str(tmp_path / "single")
  subprocess.run([*train, f"--workdir={single}"], cwd=REPO, env=_env(2), check=True, timeout=300)

  multi = str(tmp_path / "multi")
  port = free_port()
  procs = [
    subprocess.Popen(
      [
        *train,
        f"--workdir={multi}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=REPO,
      env=_env(1),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    results = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]

  expected, got = metric_rows(single), metric_rows(multi)  # only process 0 writes metrics
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  for key in ("train/loss", "train/accuracy"):
    np.testing.assert_allclose([r[key] for r in got], [r[key] for r in expected], rtol=1e-5)
  np.testing.assert_allclose(got[-1]["eval/loss"], expected[-1]["eval/loss"], rtol=1e-5)
  assert checkpoint_entries(multi) == ["2", "4"]
