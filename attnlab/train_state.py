"""The train state {step, params, opt_state}: how to create it, and the
sharded set-up that training, ahead-of-time compilation and loading share."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from attnlab import optim, sharding
from attnlab.models import build_model
from attnlab.models.attention import registry


def initializer(
  config: ConfigDict,
) -> tuple[Any, Callable[[jax.Array], dict], optax.GradientTransformation]:
  """(graphdef, init(rng) -> state, optimizer) for `config`.

  `init` is pure, so it can run under `jax.eval_shape` (abstract state) or
  under `jax.jit(..., out_shardings=...)` (created directly sharded).
  """
  tx = optim.make_optimizer(
    config.optim,
    config.total_steps,
    no_decay=registry.no_decay_names(),
    temperature=registry.temperature_names(),
  )
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0))))

  def init(rng: jax.Array) -> dict:
    params = nnx.state(build_model(config.model, nnx.Rngs(rng)))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  return graphdef, init, tx


def param_shapes(config: ConfigDict) -> dict[tuple, tuple[tuple[int, ...], str]]:
  """{parameter path: (shape, dtype)} of `config`'s model, built abstractly."""
  model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
  return {
    path: (tuple(leaf.shape), str(leaf.dtype))
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


@dataclasses.dataclass(frozen=True)
class Setup:
  """A config placed on a mesh: the model and optimizer, and the abstract
  train state whose leaves carry their shardings (nothing is allocated).

  Everything that touches sharded arrays runs inside `context()`, the one
  place that enters the mesh and the logical-axis rules.
  """

  mesh: Mesh
  rules: sharding.Rules
  graphdef: Any
  init: Callable[[jax.Array], dict]
  tx: optax.GradientTransformation
  state_sharding: Any
  abstract_state: Any  # ShapeDtypeStructs with `.sharding`

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      yield

  def create(self, rng: jax.Array) -> dict:
    """A freshly initialised train state, created directly sharded."""
    with self.context():
      return jax.jit(self.init, out_shardings=self.state_sharding)(rng)

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_state["params"]))


def setup(config: ConfigDict, mesh: Mesh) -> Setup:
  """Places `config`'s train state on `mesh` under `config.sharding_rules`.

  Works for compile-only devices too (`jax.experimental.topologies`): the
  key is made outside the mesh and everything inside stays abstract.
  """
  rules = sharding.config_rules(config.sharding_rules)
  graphdef, init, tx = initializer(config)
  key = jax.random.key(0)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    state_sharding = sharding.tree_shardings(jax.eval_shape(init, key), mesh, rules)
    abstract_state = jax.eval_shape(jax.jit(init, out_shardings=state_sharding), key)
  return Setup(mesh, rules, graphdef, init, tx, state_sharding, abstract_state)
