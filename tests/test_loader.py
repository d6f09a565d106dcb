"""attnlab.loader: a trained run's config and parameters, and nothing else."""

import jax
import numpy as np
import pytest
from flax import nnx

from attnlab import checkpoint, loader, sharding, train_state, trainer

from .conftest import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step tiny run (d_model 64, one checkpoint at step 4)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer.train_and_evaluate(tiny_config(total_steps=4, eval_every=0), workdir)
  return workdir


def _full_state(workdir):
  config = loader.load_config(workdir)
  placed = train_state.setup(config, sharding.make_mesh({}, jax.devices()[:1]))
  ckpt = checkpoint.Checkpointer(workdir, keep=3)
  try:
    return ckpt.restore(4, placed.abstract_state, None)
  finally:
    ckpt.close()


def test_load_model_reads_the_parameters_only(trained):
  restored = checkpoint.Checkpointer(trained, keep=3)
  placed = train_state.setup(loader.load_config(trained), sharding.make_mesh({}, jax.devices()[:1]))
  try:
    part = restored.restore_part(4, {"params": placed.abstract_state["params"]})
  finally:
    restored.close()
  assert set(part) == {"params"}  # no optimizer state, no step

  model, config, step = loader.load_model(trained)
  assert step == 4 and config.model.d_model == 64
  full = _full_state(trained)
  loaded = jax.tree.leaves(nnx.state(model))
  expected = jax.tree.leaves(full["params"])
  assert len(loaded) == len(expected) > 0
  for a, b in zip(loaded, expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The trained parameters, not a fresh initialisation.
  fresh = jax.tree.leaves(placed.create(jax.random.key(0))["params"])
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(loaded, fresh))


def test_load_model_restores_sharded_on_a_mesh(trained):
  mesh = sharding.make_mesh({"fsdp": 4}, jax.devices()[:4])
  model, _, _ = loader.load_model(trained, mesh=mesh)
  leaves = jax.tree.leaves(nnx.state(model))
  assert all(leaf.sharding.mesh.shape == mesh.shape for leaf in leaves)
  split = [leaf for leaf in leaves if not leaf.sharding.is_fully_replicated]
  assert split, "no parameter is sharded over fsdp"
  full = jax.tree.leaves(_full_state(trained)["params"])
  for a, b in zip(leaves, full):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_model_names_a_missing_step(trained):
  with pytest.raises(FileNotFoundError, match="step 7"):
    loader.load_model(trained, step=7)
