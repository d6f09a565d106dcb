"""Loading a trained run: its saved config (with overrides) and its
parameters, for evaluation, sampling, analysis and notebooks.

Only the parameters are read from the checkpoint, never the optimizer state
(for AdamW twice the parameters' size: about 8 GB more for a 1B model). With a
`mesh` they are restored directly sharded under the run's sharding rules, so
a model larger than one device loads too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
from absl import flags
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict, config_flags

from attnlab import checkpoint, sharding, train_state
from attnlab import config as config_lib
from attnlab.models import Transformer


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


def _fill_missing(saved: dict, defaults: dict) -> dict:
  out = dict(saved)
  for key, default in defaults.items():
    if key not in out:
      out[key] = default
    elif isinstance(default, dict) and isinstance(out[key], dict):
      out[key] = _fill_missing(out[key], default)
  return out


def load_model(
  workdir: str,
  step: int | None = None,
  overrides: Mapping[str, Any] | None = None,
  mesh: Mesh | None = None,
) -> tuple[Transformer, ConfigDict, int]:
  """(model, config, step): the trained model of a workdir (latest checkpoint
  unless `step`), built from its saved config with `overrides` applied (see
  `load_config`), e.g. an evaluation-time LSSAR power on an LSSA-trained run.

  Only the parameters are restored; with `mesh` they arrive sharded by the
  run's `sharding_rules`, otherwise on the first local device.
  """
  config = load_config(workdir, overrides)
  if mesh is None:
    mesh = sharding.make_mesh({}, jax.local_devices()[:1])
  placed = train_state.setup(config, mesh)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    restored = ckpt.restore_part(step, {"params": placed.abstract_state["params"]})
  finally:
    ckpt.close()
  return nnx.merge(placed.graphdef, restored["params"]), config, step


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
