"""The train state {step, params, opt_state} and how to create it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import ConfigDict

from attnlab import optim
from attnlab.models import build_model


def initializer(
  config: ConfigDict,
) -> tuple[Any, Callable[[jax.Array], dict], optax.GradientTransformation]:
  """(graphdef, init(rng) -> state, optimizer) for `config`.

  `init` is pure, so it can run under `jax.eval_shape` (abstract state) or
  under `jax.jit(..., out_shardings=...)` (created directly sharded).
  """
  tx = optim.make_optimizer(config.optim, config.total_steps)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0))))

  def init(rng: jax.Array) -> dict:
    params = nnx.state(build_model(config.model, nnx.Rngs(rng)))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  return graphdef, init, tx
