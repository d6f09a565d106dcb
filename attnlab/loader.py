"""Loading a trained run: its saved config (with overrides) and its
parameters, for evaluation, sampling, analysis and notebooks.

Only the parameters are read from the checkpoint, never the optimizer state
(for AdamW twice the parameters' size: about 8 GB more for a 1B model). With a
`mesh` they are restored directly sharded under the run's sharding rules, so
a model larger than one device loads too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from attnlab import checkpoint, errors, sharding, train_state
from attnlab import config as config_lib
from attnlab.models import Transformer

# The saved config of a workdir: the config system's job, used here and by validate.
load_config = config_lib.load_config


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
  if overrides:
    check_overrides_keep_shapes(workdir, config, overrides)
  if mesh is None:
    mesh = sharding.make_mesh({}, jax.local_devices()[:1])
  placed = train_state.setup(config, mesh)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    steps = sorted(ckpt.manager.all_steps())
    if not steps:
      raise errors.PathError(
        f"no checkpoint in {ckpt.directory}: the run has not saved one yet "
        "(config.checkpoint_every), or its workdir was moved"
      )
    step = steps[-1] if step is None else step
    if step not in steps:
      raise errors.PathError(
        f"no checkpoint at step {step} in {ckpt.directory}; steps on disk: {steps}"
      )
    try:
      restored = ckpt.restore_part(step, {"params": placed.abstract_state["params"]})
    except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise many kinds
      others = [s for s in steps if s != step]
      raise RuntimeError(
        f"the checkpoint at step {step} in {ckpt.directory} could not be read "
        f"({type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''})"
        + (f"; other steps on disk: {others} (--step=)" if others else "")
      ) from error
  finally:
    ckpt.close()
  return nnx.merge(placed.graphdef, restored["params"]), config, step


def check_overrides_keep_shapes(
  workdir: str, config: ConfigDict, overrides: Mapping[str, Any]
) -> None:
  """Overrides of a saved run may change how the model computes (LSSAR's
  power, a kernel implementation), not its parameters' shapes."""
  saved = train_state.param_shapes(load_config(workdir))
  if saved != train_state.param_shapes(config):
    given = ", ".join(f"--config.{k}={v}" for k, v in sorted(overrides.items()))
    raise errors.UsageError(
      f"{given} changes the shapes of the saved run's parameters, so its checkpoint "
      "cannot load; only overrides that keep them work (e.g. model.mixer.softplus.power)"
    )
