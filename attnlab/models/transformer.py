"""The one transformer trunk: embed → N pre-norm blocks → norm → LM head.

Each block is RMSNorm → attention mixer → residual, RMSNorm → SwiGLU →
residual. The mixer of every layer comes from the registry by name, so one
model can interleave variants (`config.model.layer_pattern`).

With `model.scan_layers` (every layer the same variant) the blocks are one
module whose parameters carry a leading 'layers' axis, run by `nnx.scan`:
XLA then compiles one layer instead of N, which is what keeps compile times
of deep models flat (MaxText does the same).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from attnlab import ops, sharding
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
  """Pre-norm residual block: [B, T, d_model] -> [B, T, d_model].

  With `model.canon_conv` = k > 0 the mixer's input is h + conv_k(h), h the
  normed input: a causal depthwise conv over the last k positions (a Canon
  layer, Allen-Zhu 2025), which hands every token its neighbours' features.
  """

  def __init__(self, model: ConfigDict, mixer_name: str, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(model.dtype)
    self.mixer_name = mixer_name
    self.attn_norm = layers.RMSNorm(model.d_model, eps=model.norm_eps)
    self.canon = (
      layers.ShortConv(
        model.d_model, model.canon_conv, axis=None, rngs=rngs, activation=False, kaiming_init=True
      )
      if model.canon_conv
      else None
    )
    self.mixer = attention.build(mixer_name, model, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(model.d_model, eps=model.norm_eps)
    self.mlp = layers.SwiGLU(model.d_model, model.mlp_dim, dtype=dtype, rngs=rngs)

  def mixer_input(
    self, x: jax.Array, canon_state: jax.Array | None = None, segment_ids: jax.Array | None = None
  ):
    """x [B, T, d_model] -> (the mixer's input [B, T, d_model], new canon state)."""
    h = self.attn_norm(x)
    if self.canon is None:
      return h, None
    mixed, canon_state = self.canon(h, canon_state, segment_ids)
    return h + mixed, canon_state

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x [B, T, d_model]; segment_ids [B, T] int for packed documents, or None."""
    if segment_ids is None:
      x = x + self.mixer(self.mixer_input(x)[0])
    else:
      if not getattr(self.mixer, "supports_segments", False):
        raise ValueError(
          f"mixer {self.mixer_name!r} does not support packed sequences (segment_ids, "
          f"data.pack=True); use one of {attention.registry.packing_names()}, or set "
          "data.pack=False"
        )
      x = x + self.mixer(self.mixer_input(x, segment_ids=segment_ids)[0], segment_ids=segment_ids)
    x = sharding.constrain(x, ("batch", "length", "embed"))
    return x + self.mlp(self.mlp_norm(x))

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype):
    """The mixer's cache, plus the canon conv's state when there is one."""
    cache = self.mixer.init_cache(batch, max_len, dtype)
    if self.canon is None:
      return cache
    return {"mixer": cache, "canon": self.canon.init_state(batch, dtype)}

  def step(self, x: jax.Array, cache, start: jax.Array, docs: attention.Documents):
    """x [B, t, d_model] after `start` cached tokens -> (x [B, t, d_model], new cache)."""
    if self.canon is None:
      h, _ = self.mixer_input(x)
      y, cache = self.mixer.step(h, cache, start, docs)
    else:
      h, canon_state = self.mixer_input(x, docs.carry(cache["canon"]), docs.chunk)
      y, mixer_cache = self.mixer.step(h, cache["mixer"], start, docs)
      cache = {"mixer": mixer_cache, "canon": canon_state}
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), cache


def _stacked_blocks(model: ConfigDict, name: str, num_layers: int, rngs: nnx.Rngs) -> Block:
  """num_layers Blocks as one module; parameters gain a leading 'layers' axis."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs: nnx.Rngs) -> Block:
    return Block(model, name, rngs=rngs)

  return make(rngs)


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
    names = layer_mixers(model)
    self.num_layers = len(names)
    self.scan_layers = bool(model.scan_layers)
    if self.scan_layers:
      if len(set(names)) != 1:
        raise ValueError(
          f"scan_layers needs every layer to use the same variant, got {sorted(set(names))}; "
          "set model.scan_layers=False for mixed layer patterns"
        )
      self.blocks = _stacked_blocks(model, names[0], self.num_layers, rngs)
    else:
      self.blocks = nnx.List([Block(model, name, rngs=rngs) for name in names])
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

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] int -> logits [B, T, vocab] float32 (parallel form).

    segment_ids [B, T] int: packed documents (a new one wherever the id
    changes); every mixer keeps them apart or raises.
    """
    x = sharding.constrain(self.embed(tokens), ("batch", "length", "embed"))

    def run(blk, h):
      return blk(h, segment_ids)

    apply = nnx.remat(run) if self.remat else run
    if self.scan_layers:
      x = nnx.scan(lambda h, blk: apply(blk, h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
        x, self.blocks
      )
    else:
      for block in self.blocks:
        x = apply(block, x)
    return self._logits(x)

  def layer(self, i: int) -> Block:
    """Block i (a sliced copy when layers are scanned), e.g. for analysis."""
    if not self.scan_layers:
      return self.blocks[i]
    graphdef, state = nnx.split(self.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

  def init_cache(self, batch: int, max_len: int | None = None) -> dict:
    """Empty decoding caches for every layer, plus the number of tokens seen."""
    max_len = max_len or self.max_len
    if self.scan_layers:  # one layer's cache, stacked on a leading layer axis
      one = self.layer(0).init_cache(batch, max_len, self.dtype)
      layer_caches = jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_layers, *a.shape)), one)
    else:
      layer_caches = [b.init_cache(batch, max_len, self.dtype) for b in self.blocks]
    return {
      "length": jnp.zeros((), jnp.int32),
      "layers": layer_caches,
      # Packed prompts: each cached token's document number, and the last
      # token's segment id (does the next step's first token continue it?).
      "documents": jnp.zeros((batch, max_len), jnp.int32),
      "last_segment": jnp.zeros((batch,), jnp.int32),
    }

  def step(
    self, tokens: jax.Array, cache: dict, segment_ids: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    """Consumes tokens [B, t] after `cache['length']` earlier ones.

    Prefill is one call with the whole prompt; decoding calls it with t = 1.
    segment_ids [B, t] int: a packed prompt (a new document wherever the id
    changes, and at the first token unless its id equals the last cached
    token's); each document then computes what it would alone, and later
    steps without segment_ids continue each row's last document.
    Returns logits [B, t, vocab] and the updated cache.
    """
    start = cache["length"]
    docs, documents, last = _documents(cache, tokens.shape, segment_ids)
    x = self.embed(tokens)
    if self.scan_layers:
      x, new_layers = nnx.scan(
        lambda h, blk, c: blk.step(h, c, start, docs),
        in_axes=(nnx.Carry, 0, 0),
        out_axes=(nnx.Carry, 0),
      )(x, self.blocks, cache["layers"])
    else:
      new_layers = []
      for block, layer_cache in zip(self.blocks, cache["layers"]):
        x, layer_cache = block.step(x, layer_cache, start, docs)
        new_layers.append(layer_cache)
    new_cache = {
      "length": start + tokens.shape[1],
      "layers": new_layers,
      "documents": documents,
      "last_segment": last,
    }
    return self._logits(x), new_cache


def _documents(
  cache: dict, shape: tuple[int, int], segment_ids: jax.Array | None
) -> tuple[attention.Documents, jax.Array, jax.Array]:
  """The documents of a step's tokens [B, t] after `cache['length']` cached ones.

  Returns (the mixers' `Documents`, the cache's new document numbers
  [B, max_len], the new last segment id [B]).
  """
  b, t = shape
  start = cache["length"]
  numbers = cache["documents"]
  previous = jax.lax.dynamic_index_in_dim(numbers, jnp.maximum(start - 1, 0), 1, keepdims=False)
  if segment_ids is None:
    chunk, continues, last = None, None, cache["last_segment"]
    new = jnp.broadcast_to(previous[:, None], (b, t))
  else:
    if segment_ids.shape != (b, t) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(
        f"segment_ids must be integer [batch, time] = {(b, t)} like the tokens, "
        f"got {segment_ids.dtype}{tuple(segment_ids.shape)}"
      )
    continues = (start > 0) & (segment_ids[:, 0] == cache["last_segment"])
    begins = jnp.concatenate([~continues[:, None], segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    new = previous[:, None] + jnp.cumsum(begins.astype(jnp.int32), axis=1)
    chunk, last = new, segment_ids[:, -1].astype(jnp.int32)
  numbers = jax.lax.dynamic_update_slice(numbers, new.astype(jnp.int32), (0, start))
  positions = jax.lax.dynamic_slice_in_dim(ops.segment_positions(numbers), start, t, axis=1)
  docs = attention.Documents(ids=numbers, positions=positions, chunk=chunk, continues=continues)
  return docs, numbers, last


def build_model(model: ConfigDict, rngs: nnx.Rngs) -> Transformer:
  """Builds the trunk. Sharding is applied by the caller (see trainer)."""
  with nnx.use_eager_sharding(False):
    return Transformer(model, rngs=rngs)
