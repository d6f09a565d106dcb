"""AdamW with linear warmup, cosine decay, global-norm clipping and a
per-parameter weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax
from ml_collections import ConfigDict

from attnlab.models.attention import registry

# Parameter names never decayed, whatever the variant: norm gains and biases.
_ALWAYS_NO_DECAY = frozenset({"scale", "bias", "embedding_scale"})


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return names


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and embeddings, not norm
  gains, biases or the names variants list as `no_decay` (e.g. A_log)."""
  exempt = _ALWAYS_NO_DECAY | registry.no_decay_names()

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


def make_optimizer(optim: ConfigDict, total_steps: int) -> optax.GradientTransformation:
  return optax.chain(
    optax.clip_by_global_norm(optim.clip_norm),
    optax.adamw(
      learning_rate_schedule(optim, total_steps),
      b1=optim.b1,
      b2=optim.b2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
      mask=decay_mask,
    ),
  )
