"""The one transformer trunk: embed → N pre-norm blocks → norm → LM head.

Each block is RMSNorm → attention mixer → residual, RMSNorm → SwiGLU →
residual. The mixer of every layer comes from the registry by name, so one
model can interleave variants (`config.model.layer_pattern`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from attnlab import sharding
from attnlab.models import attention, layers


def layer_mixers(model: ConfigDict) -> list[str]:
  """Per-layer variant names.

  `layer_pattern` is a comma-separated list of variant names tiled over the
  layers (its length must divide num_layers); empty means every layer uses
  `attention`. E.g. 'gated_deltanet,gated_deltanet,gated_deltanet,nats_l'.
  """
  pattern = [p.strip() for p in model.layer_pattern.split(",") if p.strip()]
  if not pattern:
    pattern = [model.attention]
  if model.num_layers % len(pattern):
    raise ValueError(
      f"layer_pattern has {len(pattern)} entries, which does not divide "
      f"num_layers={model.num_layers}"
    )
  names = pattern * (model.num_layers // len(pattern))
  for name in set(names):
    attention.get(name)  # fail early on typos
  return names


class Block(nnx.Module):
  """Pre-norm residual block: [B, T, d_model] -> [B, T, d_model]."""

  def __init__(self, model: ConfigDict, mixer_name: str, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(model.dtype)
    self.mixer_name = mixer_name
    self.attn_norm = layers.RMSNorm(model.d_model, eps=model.norm_eps)
    self.mixer = attention.build(mixer_name, model, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(model.d_model, eps=model.norm_eps)
    self.mlp = layers.SwiGLU(model.d_model, model.mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.mixer(self.attn_norm(x))
    x = sharding.constrain(x, ("batch", "length", "embed"))
    return x + self.mlp(self.mlp_norm(x))

  def step(self, x: jax.Array, cache, start: jax.Array):
    y, cache = self.mixer.step(self.attn_norm(x), cache, start)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), cache


class Transformer(nnx.Module):
  """Decoder-only LM over token ids."""

  def __init__(self, model: ConfigDict, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(model.dtype)
    self.remat = model.remat
    self.max_len = model.max_len
    self.embed = nnx.Embed(
      model.vocab_size,
      model.d_model,
      embedding_init=nnx.with_partitioning(
        nnx.initializers.normal(model.d_model**-0.5), ("vocab", "embed")
      ),
      dtype=self.dtype,
      rngs=rngs,
    )
    self.blocks = nnx.List([Block(model, name, rngs=rngs) for name in layer_mixers(model)])
    self.final_norm = layers.RMSNorm(model.d_model, eps=model.norm_eps)
    self.lm_head = (
      None
      if model.tie_embeddings
      else layers.dense(
        model.d_model, model.vocab_size, ("embed", "vocab"), dtype=self.dtype, rngs=rngs
      )
    )

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int -> logits [B, T, vocab] float32 (parallel form)."""
    x = sharding.constrain(self.embed(tokens), ("batch", "length", "embed"))
    for block in self.blocks:
      if self.remat:
        x = nnx.remat(lambda blk, h: blk(h))(block, x)
      else:
        x = block(x)
    return self._logits(x)

  def init_cache(self, batch: int, max_len: int | None = None) -> dict:
    """Empty decoding caches for every layer, plus the number of tokens seen."""
    max_len = max_len or self.max_len
    return {
      "length": jnp.zeros((), jnp.int32),
      "layers": [b.mixer.init_cache(batch, max_len, self.dtype) for b in self.blocks],
    }

  def step(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Consumes tokens [B, t] after `cache['length']` earlier ones.

    Prefill is one call with the whole prompt; decoding calls it with t = 1.
    Returns logits [B, t, vocab] and the updated cache.
    """
    start = cache["length"]
    x = self.embed(tokens)
    new_layers = []
    for block, layer_cache in zip(self.blocks, cache["layers"]):
      x, layer_cache = block.step(x, layer_cache, start)
      new_layers.append(layer_cache)
    return self._logits(x), {"length": start + tokens.shape[1], "layers": new_layers}


def build_model(model: ConfigDict, rngs: nnx.Rngs) -> Transformer:
  """Builds the trunk. Sharding is applied by the caller (see trainer)."""
  with nnx.use_eager_sharding(False):
    return Transformer(model, rngs=rngs)
