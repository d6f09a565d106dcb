"""Autoregressive generation (greedy or sampled) and loading trained models.

Generation prefills the prompt with one `Transformer.step` call and then
decodes one token at a time from the mixers' caches, all inside one jit.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from ml_collections import ConfigDict, config_flags

from attnlab import checkpoint, train_state
from attnlab import config as config_lib
from attnlab.models import Transformer


def _next_token(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int | None):
  """logits [B, vocab] -> token ids [B]."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate(graphdef, params, prompt, rng, *, max_new_tokens, temperature, top_k):
  model = nnx.merge(graphdef, params)
  batch, prompt_len = prompt.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model.step(prompt, cache)

  def decode(carry, step_rng):
    last_logits, cache = carry
    token = _next_token(last_logits, step_rng, temperature, top_k)
    logits, cache = model.step(token[:, None].astype(prompt.dtype), cache)
    return (logits[:, -1], cache), token

  rngs = jax.random.split(rng, max_new_tokens)
  _, tokens = jax.lax.scan(decode, (logits[:, -1], cache), rngs)
  return jnp.concatenate([prompt, tokens.T.astype(prompt.dtype)], axis=1)


def generate(
  model: Transformer,
  prompt: jax.Array,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int | None = None,
  rng: jax.Array | None = None,
) -> jax.Array:
  """Continues `prompt` [batch, prompt_len] by `max_new_tokens` tokens.

  temperature 0 is greedy; otherwise samples (optionally from the top_k).
  Returns [batch, prompt_len + max_new_tokens] token ids.
  """
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1], got {prompt.shape}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  graphdef, params = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(
    graphdef,
    params,
    jnp.asarray(prompt, jnp.int32),
    rng,
    max_new_tokens=max_new_tokens,
    temperature=float(temperature),
    top_k=top_k,
  )


def load_config(workdir: str, overrides: Mapping[str, Any] | None = None) -> ConfigDict:
  """The saved config of a training workdir, with `overrides` applied.

  Args:
    workdir: a training workdir (holds config.json).
    overrides: flattened 'a.b.c' -> value, e.g. {'model.mixer.softplus.power': 15.0}
      (`override_values` of the `define_config_overrides` flag).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
  with open(path) as f:
    saved = json.load(f)
  # Fields added to attnlab after the run was saved take their defaults.
  config = ConfigDict(_fill_missing(saved, config_lib.base_config().to_dict()))
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  return config


def define_config_overrides() -> flags.FlagHolder:
  """Defines (once) the `--config.x.y=value` flag of the command lines that
  load a workdir (evaluate, sample). Overrides parse with ml_collections'
  config_flags semantics against the base config (typed, unknown keys are an
  error); `override_values(holder)` then applies to the run's saved config."""
  if "config" in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS["config"])
  return config_flags.DEFINE_config_dict(
    "config",
    config_lib.base_config(),
    "Overrides of the run's saved config, e.g. --config.model.mixer.softplus.power=15.",
  )


def override_values(holder: flags.FlagHolder) -> dict[str, Any]:
  """The overrides given on the command line, flattened ('a.b.c' -> value)."""
  return dict(flags.FLAGS[holder.name].override_values)


def _fill_missing(saved: dict, defaults: dict) -> dict:
  out = dict(saved)
  for key, default in defaults.items():
    if key not in out:
      out[key] = default
    elif isinstance(default, dict) and isinstance(out[key], dict):
      out[key] = _fill_missing(out[key], default)
  return out


def load_model(
  workdir: str, step: int | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[Transformer, ConfigDict, int]:
  """The trained model of a workdir (latest checkpoint unless `step`), built
  from its saved config with `overrides` applied (see `load_config`), e.g. an
  evaluation-time LSSAR power on an LSSA-trained run."""
  config = load_config(workdir, overrides)
  graphdef, init, _ = train_state.initializer(config)

  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  abstract = jax.eval_shape(init, jax.random.key(0))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = ckpt.restore(
    step,
    checkpoint.abstract_with_sharding(abstract, jax.tree.map(lambda _: device, abstract)),
    None,
  )
  ckpt.close()
  return nnx.merge(graphdef, state["params"]), config, step
