"""Autoregressive generation (greedy or sampled); `attnlab.loader` loads trained models.

Generation prefills the prompt with one `Transformer.step` call and then
decodes one token at a time from the mixers' caches, all inside one jit.
A cache sized below the worst case (NAtS-L's `decode_attn_blocks`) flags the
rows it could not hold in an `overflow` entry; `generate` raises for them
rather than return tokens computed from a truncated context.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
def _generate(graphdef, params, prompt, segment_ids, rng, *, max_new_tokens, temperature, top_k):
  model = nnx.merge(graphdef, params)
  batch, prompt_len = prompt.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model.step(prompt, cache, segment_ids)

  def decode(carry, step_rng):
    last_logits, cache = carry
    token = _next_token(last_logits, step_rng, temperature, top_k)
    logits, cache = model.step(token[:, None].astype(prompt.dtype), cache)
    return (logits[:, -1], cache), token

  rngs = jax.random.split(rng, max_new_tokens)
  (_, cache), tokens = jax.lax.scan(decode, (logits[:, -1], cache), rngs)
  return jnp.concatenate([prompt, tokens.T.astype(prompt.dtype)], axis=1), _overflowed(cache, batch)


def _overflowed(cache, batch: int) -> jax.Array:
  """[batch] bool: rows whose cache ran out of room in any layer (entries named 'overflow')."""
  rows = jnp.zeros((batch,), bool)
  for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
    if isinstance(path[-1], jax.tree_util.DictKey) and path[-1].key == "overflow":
      # Scanned layers stack the flag as [layers, batch].
      rows = rows | leaf.reshape(-1, batch).any(axis=0)
  return rows


def generate(
  model: Transformer,
  prompt: jax.Array,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int | None = None,
  rng: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """Continues `prompt` [batch, prompt_len] by `max_new_tokens` tokens.

  temperature 0 is greedy; otherwise samples (optionally from the top_k).
  segment_ids [batch, prompt_len] int: packed prompts; each row continues its
  last document, which sees nothing before it. This batches prompts of
  different lengths exactly: put filler (any id of its own) before the
  shorter ones. Returns [batch, prompt_len + max_new_tokens] token ids.
  Raises ValueError when a row outgrew a cache sized below the worst case
  (model.mixer.nats_l.decode_attn_blocks), as its tokens would be wrong.
  """
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1], got {prompt.shape}")
  if segment_ids is not None and np.shape(segment_ids) != prompt.shape:
    raise ValueError(
      f"segment_ids must match the prompt's shape {prompt.shape}, got {np.shape(segment_ids)}"
    )
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  graphdef, params = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  tokens, overflow = _generate(
    graphdef,
    params,
    jnp.asarray(prompt, jnp.int32),
    None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32),
    rng,
    max_new_tokens=max_new_tokens,
    temperature=float(temperature),
    top_k=top_k,
  )
  rows = np.flatnonzero(np.asarray(overflow))
  if rows.size:
    raise ValueError(
      f"generation overflowed the decoding cache in batch rows {rows.tolist()}: a NAtS-L head "
      "routed more blocks to attention than its cache holds; raise "
      "model.mixer.nats_l.decode_attn_blocks (or set it to None for the worst case)"
    )
  return tokens
