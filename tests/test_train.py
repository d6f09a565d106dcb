"""The training program end to end: metrics, checkpoints, resume, sharding,
preemption, the NaN guard and generation from a checkpoint."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnlab.data
from attnlab import evaluate, generate, loader, trainer

from .conftest import REPO, checkpoint_entries, load_config, loss_by_step, metric_rows, tiny_config

pytestmark = pytest.mark.slow


def test_tiny_default_solves_mqar(tmp_path):
  """configs/tiny.py as shipped (softmax + Canon conv) learns the recall task."""
  c = load_config("tiny")
  c.progress = False
  c.total_steps = 300
  c.eval_every = 300
  c.checkpoint_every = 0
  final = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  assert final["eval/accuracy"] >= 0.9, final  # plain softmax: ≈ 0.2 at this step


def test_tiny_run_writes_metrics_checkpoints_and_generates(tmp_path):
  workdir = str(tmp_path / "run")
  final = trainer.train_and_evaluate(tiny_config(), workdir)
  rows = metric_rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, 31))
  for key in ("train/loss", "train/accuracy", "train/tokens_per_sec", "train/lr"):
    assert key in rows[-1]
  assert {"eval/loss", "eval/accuracy"} <= set(rows[9]) and "eval/loss" not in rows[8]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.3  # it learns
  assert final["eval/loss"] == rows[-1]["eval/loss"]
  assert any(
    f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard"))
  )
  assert checkpoint_entries(workdir) == ["10", "20", "30"]

  model, config, step = loader.load_model(workdir)
  assert step == 30 and config.model.d_model == 64
  prompt = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 7)), jnp.int32)
  greedy = generate.generate(model, prompt, max_new_tokens=6)
  expected = prompt
  for _ in range(6):  # greedy decoding by repeated full forward passes
    expected = jnp.concatenate([expected, jnp.argmax(model(expected)[:, -1:], -1)], axis=1)
  np.testing.assert_array_equal(greedy, expected)
  sampled = generate.generate(
    model, prompt, max_new_tokens=6, temperature=1.0, top_k=5, rng=jax.random.key(1)
  )
  again = generate.generate(
    model, prompt, max_new_tokens=6, temperature=1.0, top_k=5, rng=jax.random.key(1)
  )
  np.testing.assert_array_equal(sampled, again)
  assert sampled.shape == (2, 13) and int(sampled.max()) < 64

  # Evaluation at other lengths; at the trained length it is the trainer's eval.
  same = evaluate.evaluate_length(model, config, seq_len=32, tokens=256, bucket=8)
  np.testing.assert_allclose(same["loss"], final["eval/loss"], rtol=1e-5)
  longer = evaluate.evaluate_length(model, config, seq_len=64, tokens=256, bucket=16)
  assert len(longer["loss_by_position"]) == 4 and np.isfinite(longer["loss"])


def test_crash_and_resume_gives_the_same_losses(tmp_path, monkeypatch):
  reference = str(tmp_path / "reference")
  trainer.train_and_evaluate(tiny_config(), reference)

  real_make_dataset = attnlab.data.make_dataset

  def crashing_make_dataset(data, *, train, **kw):
    ds = real_make_dataset(data, train=train, **kw)
    if not train:
      return ds
    seen = {"n": 0}

    def count(batch):
      seen["n"] += 1
      if seen["n"] == 25:
        raise RuntimeError("simulated crash while fetching batch 25")
      return batch

    return ds.map(count)

  resumed = str(tmp_path / "resumed")
  monkeypatch.setattr(attnlab.data, "make_dataset", crashing_make_dataset)
  with pytest.raises(RuntimeError, match="simulated crash"):
    trainer.train_and_evaluate(tiny_config(), resumed)
  monkeypatch.setattr(attnlab.data, "make_dataset", real_make_dataset)
  assert max(int(s) for s in checkpoint_entries(resumed)) == 20
  trainer.train_and_evaluate(tiny_config(), resumed)  # resumes from step 20

  # A restart from step 0 would give the same losses: the rows show the resume.
  steps = [r["step"] for r in metric_rows(resumed)]
  crashed_run, resumed_run = steps[:-10], steps[-10:]
  assert crashed_run == list(range(1, len(crashed_run) + 1)) and len(crashed_run) >= 20
  assert resumed_run == list(range(21, 31))
  expected, got = loss_by_step(reference), loss_by_step(resumed)
  assert sorted(got) == list(range(1, 31))
  np.testing.assert_allclose(
    [got[s] for s in range(1, 31)], [expected[s] for s in range(1, 31)], rtol=1e-5
  )


def test_sharded_step_on_8_devices_equals_single_device(tmp_path):
  assert jax.device_count() == 8
  single = tiny_config(
    total_steps=3, eval_every=3, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}
  )
  sharded = tiny_config(
    total_steps=3, eval_every=3, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  )
  a = trainer.train_and_evaluate(single, str(tmp_path / "single"))
  b = trainer.train_and_evaluate(sharded, str(tmp_path / "sharded"))
  la, lb = loss_by_step(str(tmp_path / "single")), loss_by_step(str(tmp_path / "sharded"))
  np.testing.assert_allclose([lb[s] for s in (1, 2, 3)], [la[s] for s in (1, 2, 3)], rtol=2e-5)
  np.testing.assert_allclose(b["eval/loss"], a["eval/loss"], rtol=2e-5)
  # Gradient accumulation over 2 microbatches with remat is the same step too.
  accumulated = tiny_config(
    total_steps=3,
    eval_every=3,
    **{"optim.grad_accum_steps": 2, "model.remat": True, "mesh.data": 1},
  )
  trainer.train_and_evaluate(accumulated, str(tmp_path / "accumulated"))
  lc = loss_by_step(str(tmp_path / "accumulated"))
  np.testing.assert_allclose([lc[s] for s in (1, 2, 3)], [la[s] for s in (1, 2, 3)], rtol=2e-5)


def test_state_is_created_sharded_by_the_logical_rules():
  """Parameters and their Adam moments really are split over the mesh."""
  from flax import nnx

  from attnlab import sharding, train_state

  config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = sharding.config_rules(config.sharding_rules)
  _, init, _ = train_state.initializer(config)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    shardings = sharding.tree_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, rules)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  up = state["params"]["blocks"][0]["mlp"]["up"]["kernel"][...]
  assert up.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert up.addressable_shards[0].data.shape == (up.shape[0] // 2, up.shape[1] // 2)
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.shape == up.shape]
  assert moments and all(m.sharding.spec == up.sharding.spec for m in moments)


def test_nan_guard_names_the_first_bad_step(tmp_path):
  overrides = {"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.clip_norm": 1e30}
  # Logging every 10 steps, the guard still finds the exact first bad step...
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step \d+") as sparse:
    trainer.train_and_evaluate(
      tiny_config(total_steps=20, log_every=10, **overrides), str(tmp_path / "a")
    )
  bad_step = int(re.search(r"at step (\d+)", str(sparse.value)).group(1))
  # ...which is the step after the last finite one when every step is logged.
  with pytest.raises(trainer.NonFiniteLossError, match=rf"at step {bad_step}\b"):
    trainer.train_and_evaluate(
      tiny_config(total_steps=20, log_every=1, **overrides), str(tmp_path / "b")
    )
  rows = metric_rows(str(tmp_path / "b"))
  assert [r["step"] for r in rows] == list(range(1, bad_step))
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  assert not os.path.exists(os.path.join(tmp_path, "b", "checkpoints", str(bad_step)))


def test_sigterm_saves_and_rerun_continues(tmp_path):
  workdir = str(tmp_path / "preempted")
  cmd = [
    sys.executable,
    "-m",
    "attnlab.train",
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    "--config.log_every=1",
    "--config.progress=False",
    "--config.total_steps=100000",
    "--config.checkpoint_every=100000",
  ]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and (not os.path.exists(metrics) or len(metric_rows(workdir)) < 5):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  stopped_at = metric_rows(workdir)[-1]["step"]
  assert checkpoint_entries(workdir) == [str(stopped_at)]
  rerun = subprocess.run(
    cmd[:-2] + [f"--config.total_steps={stopped_at + 3}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert rerun.returncode == 0, rerun.stderr
  # The rerun continues after the saved step (a restart would log 1, 2, ... again).
  steps = [r["step"] for r in metric_rows(workdir)]
  assert steps == list(range(1, stopped_at + 4))


def test_grain_map_keeps_checkpointable_iterator():
  # The crash test relies on .map() over the pipeline keeping grain state.
  ds = grain.MapDataset.range(10).to_iter_dataset().map(lambda x: x)
  it = iter(ds)
  next(it)
  assert "next_index" in json.dumps(it.get_state())


def test_ssa_with_its_temperature_lr_group_trains_and_resumes(tmp_path):
  """A second optimizer group masks parts of the state (optax.MaskedNode);
  sharding and restoring must keep that structure."""
  workdir = str(tmp_path / "ssa")
  config = tiny_config(**{"model.attention": "ssa", "total_steps": 8, "checkpoint_every": 4})
  trainer.train_and_evaluate(config, workdir)
  config = tiny_config(**{"model.attention": "ssa", "total_steps": 10, "checkpoint_every": 4})
  trainer.train_and_evaluate(config, workdir)
  steps = [r["step"] for r in metric_rows(workdir)]
  assert steps == list(range(1, 11))  # the second run resumed at step 8's checkpoint
  assert np.isfinite(metric_rows(workdir)[-1]["train/loss"])


def test_evaluate_applies_config_overrides_to_the_saved_run(tmp_path):
  """LSSA trains by default; LSSAR's power is an evaluation-time override
  (`python -m attnlab.evaluate --config.model.mixer.softplus.power=15`)."""
  workdir = str(tmp_path / "lssa")
  config = tiny_config(**{"model.attention": "softplus", "total_steps": 2, "eval_every": 0})
  trainer.train_and_evaluate(config, workdir)
  model, loaded, _ = loader.load_model(workdir)
  assert loaded.model.mixer.softplus.power == 0.0 and model.blocks[0].mixer.power is None
  overrides = {"model.mixer.softplus.power": 15.0}
  lssar, loaded, _ = loader.load_model(workdir, overrides=overrides)
  assert loaded.model.mixer.softplus.power == 15.0 and lssar.blocks[0].mixer.power == 15.0

  cmd = [sys.executable, "-m", "attnlab.evaluate", f"--workdir={workdir}", "--tokens=256"]
  cmd += ["--seq_lens=32", "--bucket=16"]
  for extra in ([], ["--config.model.mixer.softplus.power=15"]):
    run = subprocess.run(cmd + extra, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
  with open(os.path.join(workdir, "eval_lengths.json")) as f:
    plain = json.load(f)
  with open(os.path.join(workdir, "eval_lengths_power=15.0.json")) as f:
    reweighted = json.load(f)
  assert plain["overrides"] == {} and reweighted["overrides"] == overrides
  lssa_loss = evaluate.evaluate_length(model, loaded, seq_len=32, tokens=256, bucket=16)["loss"]
  lssar_loss = evaluate.evaluate_length(lssar, loaded, seq_len=32, tokens=256, bucket=16)["loss"]
  np.testing.assert_allclose(plain["results"][0]["loss"], lssa_loss, rtol=1e-5)
  np.testing.assert_allclose(reweighted["results"][0]["loss"], lssar_loss, rtol=1e-5)
  assert abs(lssa_loss - lssar_loss) > 1e-4  # the power really changed the model

  typo = subprocess.run(
    cmd + ["--config.model.mixer.softplus.powr=15"], cwd=REPO, capture_output=True, text=True
  )
  assert typo.returncode != 0 and "powr" in typo.stderr


@pytest.mark.parametrize("scan", [False, True])
def test_train_step_reports_nats_l_block_fraction_per_layer(scan):
  """The trainer asks the mixers for their statistics inside its step (they
  are off by default, so the model's state stays fixed elsewhere)."""
  from attnlab import train_state

  c = tiny_config(**{"model.attention": "nats_l", "model.scan_layers": scan})
  c.model.mixer.nats_l.block_size = 8
  graphdef, init, tx = train_state.initializer(c)
  state = init(jax.random.key(0))
  train_step, _ = trainer.make_steps(c, graphdef, tx)
  batch = next(iter(attnlab.data.make_dataset(c.data, seed=0, train=True)))
  _, step_metrics = jax.jit(train_step)(state, batch)
  names = sorted(k for k in step_metrics if k.endswith("attn_block_fraction"))
  assert names == [f"train/layer_{i}/attn_block_fraction" for i in range(c.model.num_layers)]
  assert all(0.0 <= float(step_metrics[k]) <= 1.0 for k in names)
