"""Oracle for LUCID's preconditioned values: the decoding recurrence,

    v′_t = v_t − Σ_{j<t} exp(k̂_t·k̂_j/√D − √D) v′_j

one token at a time over the context and then the new tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def preconditioned_values(
  k, v, *, eps, block_size, context_keys, context_values, context_length, segment_ids=None
):
  """segment_ids: [B, T] document ids of the new tokens, or with a context the
  cache rows' [B, cache_len] (the new tokens' at rows context_length ..): a
  token's sum runs over its own document."""
  del block_size
  d = k.shape[-1]
  b, t, h, dv = v.shape
  normalize = lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  docs = None if segment_ids is None else jnp.cumsum(
    jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1), 1
  )  # fmt: skip
  if context_keys is None:
    keys = normalize(k)
    values = jnp.zeros_like(v)
    offset = 0
  else:
    # Zero the context beyond its valid length; new tokens go after it.
    valid = (jnp.arange(context_keys.shape[1]) < context_length)[None, :, None, None]
    keys = jnp.concatenate([jnp.where(valid, normalize(context_keys), 0.0), normalize(k)], 1)
    values = jnp.concatenate([jnp.where(valid, context_values, 0.0), jnp.zeros_like(v)], 1)
    offset = context_keys.shape[1]
    if docs is not None:  # the new tokens' documents, after the context's
      new_docs = jax.lax.dynamic_slice_in_dim(docs, context_length, t, axis=1)
      docs = jnp.concatenate([docs, new_docs], 1)
  limit = jnp.asarray(context_length if context_keys is not None else 0)
  positions = jnp.arange(keys.shape[1])

  def one_token(values, i):
    row = offset + i
    logits = jnp.einsum("bhd,bshd->bsh", keys[:, row], keys) * d**-0.5 - d**0.5
    seen = ((positions < limit) | ((positions >= offset) & (positions < row)))[None, :, None]
    if docs is not None:
      seen = seen & (docs == docs[:, row, None])[:, :, None]
    weights = jnp.where(seen, jnp.exp(logits), 0.0)
    v_prime = v[:, i] - jnp.einsum("bsh,bshe->bhe", weights, values)
    return values.at[:, row].set(v_prime), v_prime

  _, out = jax.lax.scan(one_token, values, jnp.arange(t))
  return jnp.moveaxis(out, 0, 1).reshape(b, t, h, dv)
