"""AdamW with linear warmup, cosine decay, global-norm clipping and a
per-parameter weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax
from ml_collections import ConfigDict

# Parameter names never decayed, whatever the variant: norm gains and biases.
_ALWAYS_NO_DECAY = frozenset({"scale", "bias"})


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return names


def decay_mask(params: Any, no_decay: frozenset[str] = frozenset()) -> Any:
  """True where weight decay applies: matrices and embeddings, not norm
  gains, biases or the parameter names in `no_decay` (e.g. A_log)."""
  exempt = _ALWAYS_NO_DECAY | no_decay

  def decays(path, leaf):
    names = [n for n in _path_names(path) if n != "value"]
    return not (set(names) & exempt) and getattr(leaf, "ndim", 0) >= 2

  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(optim: ConfigDict, total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim.lr,
    warmup_steps=optim.warmup_steps,
    decay_steps=max(total_steps, optim.warmup_steps + 1),
    end_value=optim.lr * optim.min_lr_ratio,
  )


def temperature_mask(params: Any, names: frozenset[str]) -> Any:
  """True for parameters named in `names` (temperatures: own learning rate)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: bool(set(_path_names(path)) & names), params
  )


def _adamw(
  optim: ConfigDict, total_steps: int, peak_lr: float, no_decay: frozenset[str]
) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(optim, total_steps)
  return optax.adamw(
    lambda step: schedule(step) * (peak_lr / optim.lr),
    b1=optim.b1,
    b2=optim.b2,
    eps=optim.eps,
    weight_decay=optim.weight_decay,
    mask=lambda params: decay_mask(params, no_decay),
  )


def make_optimizer(
  optim: ConfigDict,
  total_steps: int,
  *,
  no_decay: frozenset[str] = frozenset(),
  temperature: frozenset[str] = frozenset(),
) -> optax.GradientTransformation:
  """Clipping, then AdamW; temperature parameters follow the same schedule
  scaled to `optim.temperature_lr` (0: the base lr), as in SSA's recipe.

  `no_decay` and `temperature` are parameter names (the variants declare
  theirs in the registry; `train_state.initializer` passes them in).
  """
  temperature_lr = optim.temperature_lr or optim.lr
  return optax.chain(
    optax.clip_by_global_norm(optim.clip_norm),
    optax.multi_transform(
      {
        "base": _adamw(optim, total_steps, optim.lr, no_decay),
        "temperature": _adamw(optim, total_steps, temperature_lr, no_decay),
      },
      lambda params: jax.tree.map(
        lambda t: "temperature" if t else "base", temperature_mask(params, temperature)
      ),
    ),
  )
