"""NAtS-L: token-level hybrid of Gated DeltaNet and softmax attention
(Deng, Winje, Fehring & Lindauer, 2026; automl/NeuralAttentionSearchLinear).

One set of conv'd q/k/v projections is viewed twice: as H Gated DeltaNet
heads (q, k L2-normalised, head dims dk / dv) and as Ha = H·r softmax heads
(qk-RMSNorm, NoPE, dims key_dim/Ha and value_dim/Ha). Each block of
`block_size` tokens gets a type per NAtS head (= delta head, controlling r
softmax heads) from its mean-pooled input:

    types = one_hot(argmax(W_s · mean(x_block)))     index 0 = attention, 1 = delta

trained with a softmax straight-through estimator. As in the official
kernels, only the chosen option passes gradient back, and neither option's
gradient is scaled: the attention option's is the sum of the block's score
gradients, the delta option's ⟨dS_end, ΔS_block⟩ with ΔS_block =
Σ_{t ∈ block} e^{g_last − g_t} k_t u_tᵀ, the block's write decayed to the
block end (official `common/chunk_o.py`: Σ k·dk·exp(g_last − g); upstream
commit 72924be removed an earlier 1/block_size from both). The ops take
the types as multiplicative gates, so autodiff yields exactly these
derivatives of a soft gate at its hard value. Attention-typed
blocks stay visible to later softmax queries; delta-typed blocks are written
into the recurrent state (which decays through every block); every query sees
its own block through both operators. The outputs merge as

    y = W_o ((w_δ·RMSNorm₁(o_δ) + w_a·RMSNorm₂(o_a)) ⊙ swish(W_g x)),  w = softmax(W_w q)

with q the conv'd q before normalisation.

Decisions where the released code leaves room: there is no sparsity
regulariser (the released code has none); the attention-block fraction is
logged over all blocks, including an incomplete last one; the scorer and the
merge-weight projection are bias-free like every other projection here.

The attention-block fraction is sown as nnx.Intermediate only when the
mixer's `collect_statistics` is set (`model.set_attributes(
collect_statistics=True, raise_if_not_found=False)`, as attnlab.trainer does
inside its step, then pops them). Off by default: sow appends to a tuple, so
a model that sowed on every call would change its state structure each step
and recompile in a plain nnx.jit training loop.

Decoding keeps the block-aware cache: compacted per-head KV slots holding only
attention-typed blocks plus the current one (valid because the softmax path
is NoPE), the running delta state and its snapshot at the block start, the
block's summed input (for the type decision when it completes) and its summed
log decay (to roll a block back when it turns out attention-typed). A
multi-token step (prefill) runs whole blocks through the parallel ops in
chunks of `prefill_chunk_blocks` and leaves the same cache as the token
recurrence. `decode_attn_blocks` caps the KV slots below the worst case;
a row that needs more sets `overflow`, on which `attnlab.generate` raises.
In a packed prompt (`segment_ids`) every document restarts the delta state,
the block bookkeeping and the slot count (its blocks reuse the slots); as in
training, documents must start on block boundaries, and such a prefill runs
one block per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from attnlab import ops
from attnlab.models import layers
from attnlab.models.attention import base, common_form, gated_deltanet, registry

ATTENTION, DELTA = 0, 1  # option order of the block types


def block_means(x: jax.Array, block_size: int) -> jax.Array:
  """[B, T, D] -> [B, N, D] per-block means; an incomplete last block uses its real length."""
  b, t, d = x.shape
  n = -(-t // block_size)
  sums = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * block_size - t), (0, 0)))
  sums = sums.reshape(b, n, block_size, d).sum(axis=2)
  counts = jnp.minimum(block_size, t - block_size * jnp.arange(n))
  return sums / counts[None, :, None]


def straight_through_types(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[..., 2] scorer logits -> (gates, hard one-hot).

  Forward: the hard one-hot. Backward: the softmax Jacobian, fed only by the
  chosen option's gradient d(loss)/d(gate), unscaled (as the official kernels).
  """
  soft = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), 2, dtype=jnp.float32)
  types = hard + soft - jax.lax.stop_gradient(soft)
  # The unchosen option's gradient is not computed by the official kernels.
  frozen = jax.lax.stop_gradient(types)
  return frozen + hard * (types - frozen), hard


def _forms(mixer: NAtSL, x: jax.Array) -> common_form.Forms:
  """The direct sum of the delta path (a DeltaForm with block resets and the
  hard block types as write gates) and the block-sparse softmax path."""
  dt = common_form.analysis_dtype(x)
  heads_first = lambda a: common_form.heads_first(a, dt)
  t = x.shape[1]
  (qd, kd, vd, g, beta), (qa, ka, va), _, _ = mixer.views(x)
  _, hard = mixer.block_types(x)  # [B, N, H, 2]; the forward pass uses the hard types
  size = mixer.block_size
  block = jnp.arange(t) // size
  complete = (block + 1) * size <= t  # an incomplete last block never writes
  write = hard[..., DELTA][:, block] * complete[None, :, None]
  delta = common_form.DeltaForm(
    log_alpha=heads_first(g),
    beta=heads_first(beta),
    k=heads_first(kd),
    c=heads_first(qd) * mixer.head_k**-0.5,
    u=heads_first(vd),
    write=heads_first(write),
    reset=jnp.arange(t) % size == 0,
  )
  group = mixer.attn_heads // mixer.heads
  key_type = jnp.repeat(hard[..., ATTENTION], group, axis=2)[:, block]  # [B, T(key), Ha]
  earlier = block[None, :] < block[:, None]  # [T(query), T(key)]
  same = block[None, :] == block[:, None]
  visible = same[None, None] | (earlier[None, None] & (heads_first(key_type) > 0)[:, :, None])
  attention = common_form.KernelForm(
    q=heads_first(qa),
    k=heads_first(ka),
    scale=jnp.full((x.shape[0], mixer.attn_heads, t), mixer.attn_k**-0.5, dt),
    u=heads_first(va),
    visible=visible,
  )
  return {"delta": delta, "attention": attention}


def _readout(mixer: NAtSL, x: jax.Array, outputs: dict[str, jax.Array]) -> jax.Array:
  merge = mixer.views(x)[2]
  o_delta, o_attn = (common_form.time_first(outputs[p]) for p in ("delta", "attention"))
  return mixer.output(x, o_delta, o_attn, merge)


@registry.register(
  "nats_l",
  uses_rope=False,
  analysis=common_form.Adapter(
    forms=_forms, readout=_readout, hooks=("views", "block_types", "output")
  ),
  no_decay=("A_log", "dt_bias"),
)
class NAtSL(base.Mixer):
  """NAtS-L mixer: [B, T, d_model] -> [B, T, d_model]."""

  def __init__(self, model: ConfigDict, options: ConfigDict, *, use_rope: bool, rngs: nnx.Rngs):
    del use_rope  # the softmax path is NoPE; the delta path needs no positions
    super().__init__(model, options, rngs=rngs)
    delta_options = ConfigDict(dict(options, num_v_heads=0))
    self.heads, self.head_k, _, self.head_v = gated_deltanet.head_geometry(model, delta_options)
    self.attn_heads = options.num_attn_heads or 2 * self.heads
    key_dim, value_dim = self.heads * self.head_k, self.heads * self.head_v
    if self.attn_heads % self.heads or key_dim % self.attn_heads or value_dim % self.attn_heads:
      raise ValueError(
        f"nats_l: num_attn_heads={self.attn_heads} must be a multiple of num_heads="
        f"{self.heads} and divide key_dim={key_dim} and value_dim={value_dim}"
      )
    self.attn_k, self.attn_v = key_dim // self.attn_heads, value_dim // self.attn_heads
    d, dt = model.d_model, self.dtype
    self.inputs = gated_deltanet.DeltaInputs(model, delta_options, rngs=rngs)
    self.scorer = layers.dense(d, 2 * self.heads, ("embed", None), dtype=jnp.float32, rngs=rngs)
    self.merge = layers.dense(key_dim, 2 * self.attn_heads, ("heads", None), dtype=dt, rngs=rngs)
    self.q_norm = layers.RMSNorm(self.attn_k, eps=model.norm_eps)
    self.k_norm = layers.RMSNorm(self.attn_k, eps=model.norm_eps)
    self.delta_norm = layers.RMSNorm(self.attn_v, eps=model.norm_eps)
    self.attn_norm = layers.RMSNorm(self.attn_v, eps=model.norm_eps)
    self.g_proj = layers.dense(d, value_dim, ("embed", "heads"), dtype=dt, rngs=rngs)
    self.o_proj = layers.dense(value_dim, d, ("heads", "embed"), dtype=dt, rngs=rngs)
    self.block_size = options.block_size
    for name in ("prefill_chunk_blocks", "decode_attn_blocks"):
      value = options[name]
      if value is not None and (not isinstance(value, int) or value < 0):
        raise ValueError(f"nats_l: {name}={value!r} must be a non-negative integer")
    self.prefill_chunk_blocks = options.prefill_chunk_blocks
    self.decode_attn_blocks = options.decode_attn_blocks
    self.implementation = options.implementation
    self.collect_statistics = False  # opt-in: see the module docstring

  def views(
    self, x: jax.Array, conv_states: dict | None = None, segment_ids: jax.Array | None = None
  ):
    """Both head views of the shared projections, for every token of x [B, T, d_model].

    Returns:
      (delta, attention, merge, new conv states), continuing from `conv_states`:
      delta = (q, k [B,T,H,dk] L2-normalised, v [B,T,H,dv], g, β [B,T,H]
      float32); attention = (q, k [B,T,Ha,dka] qk-RMSNormed, v [B,T,Ha,dva]);
      merge = the softmax weights (w_δ, w_a) [B,T,Ha,2] of the two paths.
    """
    b, t, _ = x.shape
    q, k, v, g, beta, conv = self.inputs(x, conv_states, segment_ids)
    delta = (
      layers.l2_normalize(q.reshape(b, t, self.heads, self.head_k)),
      layers.l2_normalize(k.reshape(b, t, self.heads, self.head_k)),
      v.reshape(b, t, self.heads, self.head_v),
      g,
      beta,
    )
    attn = (
      self.q_norm(q.reshape(b, t, self.attn_heads, self.attn_k)),
      self.k_norm(k.reshape(b, t, self.attn_heads, self.attn_k)),
      v.reshape(b, t, self.attn_heads, self.attn_v),
    )
    merge = jax.nn.softmax(
      self.merge(q).astype(jnp.float32).reshape(b, t, self.attn_heads, 2), axis=-1
    )
    return delta, attn, merge, conv

  def output(
    self, x: jax.Array, o_delta: jax.Array, o_attn: jax.Array, merge: jax.Array
  ) -> jax.Array:
    """The two paths' outputs o_delta [B,T,H,dv] and o_attn [B,T,Ha,dva] ->
    [B, T, d_model]: per-path RMSNorm, merged with `merge` [B,T,Ha,2], the
    swish gate from x [B, T, d_model], the output projection."""
    b, t, _ = x.shape
    o_delta = o_delta.reshape(b, t, self.attn_heads, self.attn_v)
    y = merge[..., :1] * self.delta_norm(o_delta) + merge[..., 1:] * self.attn_norm(o_attn)
    gate = self.g_proj(x).reshape(y.shape).astype(jnp.float32)
    y = (y * jax.nn.silu(gate)).astype(self.dtype)
    return self.o_proj(y.reshape(b, t, -1))

  def block_types(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D] -> (straight-through gates, hard one-hot), both [B, N, H, 2]."""
    logits = self.scorer(block_means(x, self.block_size))
    return straight_through_types(logits.reshape(*logits.shape[:2], self.heads, 2))

  supports_segments = True  # packed documents, each starting on a block boundary

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, d_model] -> [B, T, d_model] (parallel form).

    segment_ids [B, T] int: packed documents, each starting on a block
    boundary (`data.pack_align`, checked at startup), so no routing block
    spans two documents; the convs, the state and the attention stay within
    each document.
    """
    delta, attn, merge, _ = self.views(x, None, segment_ids)
    gates, hard = self.block_types(x)
    group = self.attn_heads // self.heads
    o_delta = ops.block_gated_delta_rule(
      *delta,
      gates[..., DELTA],
      block_size=self.block_size,
      segment_ids=segment_ids,
      implementation=self.implementation,
    )
    o_attn = ops.block_sparse_softmax(
      *attn,
      jnp.repeat(gates[..., ATTENTION], group, axis=2),
      block_size=self.block_size,
      segment_ids=segment_ids,
      implementation=self.implementation,
    )
    if self.collect_statistics:
      self.sow(nnx.Intermediate, "attn_block_fraction", jnp.mean(hard[..., ATTENTION]))
    return self.output(x, o_delta, o_attn, merge)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict:
    """The block-aware decoding cache (see the module docstring) for max_len tokens.

    KV slots: [batch, slots, block_size, attn_heads, head_dim]; slots =
    ceil(max_len / block_size) (every block attention-typed), or
    decode_attn_blocks + 1 when that is smaller: the attention-typed blocks
    routing is expected to keep plus the current block. `overflow` [batch]
    records a row that needed a slot beyond them.
    """
    slots = -(-max_len // self.block_size)
    if self.decode_attn_blocks is not None:
      slots = min(slots, self.decode_attn_blocks + 1)
    kv = (batch, slots, self.block_size, self.attn_heads)
    state = jnp.zeros((batch, self.heads, self.head_k, self.head_v), jnp.float32)
    return {
      "conv": self.inputs.init_conv_states(batch, dtype),
      "state": state,
      "block_start_state": state,
      "block_log_decay": jnp.zeros((batch, self.heads), jnp.float32),
      "block_input_sum": jnp.zeros((batch, self.d_model), jnp.float32),
      "k": jnp.zeros((*kv, self.attn_k), dtype),
      "v": jnp.zeros((*kv, self.attn_v), dtype),
      "num_attn_blocks": jnp.zeros((batch, self.attn_heads), jnp.int32),
      "overflow": jnp.zeros((batch,), bool),
    }

  def _block_is_attention(self, input_sum: jax.Array) -> jax.Array:
    """Summed input of complete blocks [..., d_model] -> [..., heads] bool (the hard type)."""
    logits = (input_sum / self.block_size) @ self.scorer.kernel[...]
    return jnp.argmax(logits.reshape(*logits.shape[:-1], self.heads, 2), axis=-1) == ATTENTION

  @staticmethod
  def _restart(carry: dict, rows: jax.Array) -> dict:
    """The carry with a new document begun in rows [B] (bool): zero state and block
    bookkeeping; the KV slots stay, hidden by a slot count of zero."""
    fresh = ("state", "block_start_state", "block_log_decay", "block_input_sum", "num_attn_blocks")

    def reset(leaf):
      mask = rows.reshape((-1,) + (1,) * (leaf.ndim - 1))
      return jnp.where(mask, jnp.zeros_like(leaf), leaf)

    return {key: reset(value) if key in fresh else value for key, value in carry.items()}

  def _tokens(
    self, carry: dict, inputs: tuple, positions: jax.Array, active: jax.Array, starts: jax.Array
  ):
    """The recurrence over inputs (the views and x, each [B, L, ...]) at positions [L].

    Tokens with active [L] False leave the carry alone (their outputs are
    junk): the prefill runs its unaligned parts with static lengths. A token
    with starts [B, L] True begins a new document in its row.
    Returns (carry, (o_delta [B,L,H,dv], o_attn [B,L,Ha,dva])).
    """
    size, group = self.block_size, self.attn_heads // self.heads
    slots = carry["k"].shape[1]
    slot_ids = jnp.arange(slots)[None, :, None]  # [1, S, 1]
    offsets = jnp.arange(size)
    attn_scale = self.attn_k**-0.5

    def one_token(carry, inputs):
      qd, kd, vd, gd, bd, qa, ka, va, xt, starts, pos, on = inputs
      carry = self._restart(carry, starts & on)
      offset = pos % size
      o_delta, state = ops.gated_delta_rule_step(qd, kd, vd, gd, bd, carry["state"])

      # Write this token into the head's current slot, then attend.
      current = slot_ids == carry["num_attn_blocks"][:, None, :]  # [B, S, Ha]
      here = current[:, :, None, :, None] & (offsets == offset)[None, None, :, None, None]
      k_slots = jnp.where(here, ka[:, None, None].astype(carry["k"].dtype), carry["k"])
      v_slots = jnp.where(here, va[:, None, None].astype(carry["v"].dtype), carry["v"])
      o_attn = ops.block_sparse_softmax_cached(
        qa[:, None].astype(jnp.float32), k_slots, v_slots, carry["num_attn_blocks"], offset + 1,
        scale=attn_scale,
      )[:, 0]  # fmt: skip
      # A head whose attention-typed blocks fill every slot has none for this token.
      full = jnp.any(carry["num_attn_blocks"] >= slots, axis=1)

      # Close the block: decide its type, keep or roll back its delta write.
      log_decay = carry["block_log_decay"] + gd
      input_sum = carry["block_input_sum"] + xt.astype(jnp.float32)
      is_attn = self._block_is_attention(input_sum)
      decayed = jnp.exp(log_decay)[..., None, None] * carry["block_start_state"]
      closed = jnp.where(is_attn[..., None, None], decayed, state)
      end = offset == size - 1
      new = {
        "state": jnp.where(end, closed, state),
        "block_start_state": jnp.where(end, closed, carry["block_start_state"]),
        "block_log_decay": jnp.where(end, 0.0, log_decay),
        "block_input_sum": jnp.where(end, 0.0, input_sum),
        "k": k_slots,
        "v": v_slots,
        "num_attn_blocks": carry["num_attn_blocks"]
        + (end & jnp.repeat(is_attn, group, axis=1)).astype(jnp.int32),
        "overflow": carry["overflow"] | full,
      }
      new = jax.tree.map(lambda n, c: jnp.where(on, n, c), new, carry)
      return new, (o_delta, o_attn)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (*inputs, starts)) + (positions, active)
    carry, outputs = jax.lax.scan(one_token, carry, xs)
    return carry, tuple(jnp.moveaxis(a, 0, 1) for a in outputs)

  def _blocks(self, carry: dict, inputs: tuple, valid: jax.Array):
    """One prefill chunk of whole blocks through the parallel ops.

    inputs: the views, x and the document starts, each [B, C·block_size, ...],
    starting at a block boundary; valid [C] marks the blocks that belong to
    the prompt (the rest are padding after it and leave the carry alone). A
    chunk of a packed prompt is one block, whose first token may begin a
    document. Returns (carry, (o_delta, o_attn)) as the token recurrence
    leaves them.
    """
    qd, kd, vd, gd, bd, qa, ka, va, x, starts = inputs
    carry = self._restart(carry, starts[:, 0] & valid[0])
    b, t, _ = x.shape
    size, group = self.block_size, self.attn_heads // self.heads
    chunk = t // size
    tokens_valid = jnp.repeat(valid, size)[None, :, None]
    # Padding tokens neither decay nor write the state (g = β = 0).
    gd, bd = jnp.where(tokens_valid, gd, 0.0), jnp.where(tokens_valid, bd, 0.0)
    input_sum = x.astype(jnp.float32).reshape(b, chunk, size, -1).sum(axis=2)
    typed = self._block_is_attention(input_sum)  # [B, C, H]
    is_attn, is_delta = typed & valid[None, :, None], ~typed & valid[None, :, None]
    o_delta, state = ops.block_gated_delta_rule(
      qd, kd, vd, gd, bd, is_delta.astype(jnp.float32),
      block_size=size,
      initial_state=carry["state"],
      return_final_state=True,
      implementation=self.implementation,
    )  # fmt: skip

    # The chunk's keys in the cache's dtype, as the token path reads them back.
    ka, va = ka.astype(carry["k"].dtype), va.astype(carry["v"].dtype)
    attn_blocks = jnp.repeat(is_attn, group, axis=2)  # [B, C, Ha]
    o_attn = ops.block_sparse_softmax_prefill(
      qa.astype(jnp.float32), ka, va, attn_blocks.astype(jnp.float32),
      carry["k"], carry["v"], carry["num_attn_blocks"],
      scale=self.attn_k**-0.5,
    )  # fmt: skip

    # Compact the attention-typed blocks into the next free slots of each head,
    # in order; every valid block needs its slot while it is the current block.
    slots = carry["k"].shape[1]
    count = attn_blocks.astype(jnp.int32)
    slot = carry["num_attn_blocks"][:, None, :] + jnp.cumsum(count, axis=1) - count  # [B, C, Ha]
    full = jnp.any(valid[None, :, None] & (slot >= slots), axis=(1, 2))
    target = jnp.where(attn_blocks, slot, slots)  # out of range: dropped
    rows = jnp.arange(b)[:, None, None], target, slice(None), jnp.arange(self.attn_heads)
    as_blocks = lambda a: jnp.swapaxes(a.reshape(b, chunk, size, *a.shape[2:]), 2, 3)
    return {
      "state": state,
      "block_start_state": state,
      "block_log_decay": carry["block_log_decay"],  # zero at a block boundary
      "block_input_sum": carry["block_input_sum"],
      "k": carry["k"].at[rows].set(as_blocks(ka), mode="drop"),
      "v": carry["v"].at[rows].set(as_blocks(va), mode="drop"),
      "num_attn_blocks": carry["num_attn_blocks"] + count.sum(axis=1),
      "overflow": carry["overflow"] | full,
    }, (o_delta, o_attn)

  def step(
    self, x: jax.Array, cache: dict, start: jax.Array, docs: base.Documents
  ) -> tuple[jax.Array, dict]:
    """x [B, t, d_model] after `start` earlier tokens -> ([B, t, d_model], new cache).

    Fewer tokens than a block (decoding) run the token recurrence. A longer x
    (a prefill) runs it up to the next block boundary, then whole blocks in
    chunks of prefill_chunk_blocks (one block in a packed prompt) through the
    parallel ops, then the remaining tokens one by one. `start` is traced, so
    each part has a static length (the longest it can be) and masks the
    tokens it does not own.
    """
    b, t, _ = x.shape
    delta, attn, merge, conv = self.views(x, docs.carry(cache["conv"]), docs.chunk)
    carry = {key: value for key, value in cache.items() if key != "conv"}
    if docs.chunk is None:
      starts = jnp.zeros((b, t), bool)
    else:  # the tokens that begin a document
      changed = docs.chunk[:, 1:] != docs.chunk[:, :-1]
      starts = jnp.concatenate([~docs.continues[:, None], changed], axis=1)
    inputs = (*delta, *attn, x, starts)
    size = self.block_size
    if t < size:
      positions = start + jnp.arange(t)
      carry, (o_delta, o_attn) = self._tokens(
        carry, inputs[:-1], positions, jnp.ones(t, bool), starts
      )
      return self.output(x, o_delta, o_attn, merge), {**carry, "conv": conv}

    chunk = min(self.prefill_chunk_blocks or max(1, 1024 // size), t // size)
    if docs.chunk is not None:
      chunk = 1  # a document may begin at any block: restart the carry between blocks
    num_chunks = -(-(t // size) // chunk)
    body = num_chunks * chunk * size
    length = body + 2 * size  # holds every part at any offset, so no slice is clamped
    padded = tuple(jnp.pad(a, [(0, 0), (0, length - t)] + [(0, 0)] * (a.ndim - 2)) for a in inputs)
    take = lambda begin, n: tuple(jax.lax.dynamic_slice_in_dim(a, begin, n, 1) for a in padded)
    span = jnp.arange(size - 1)

    head = (-start) % size  # tokens before the next block boundary
    whole = (t - head) // size  # whole blocks after them
    tail = head + whole * size
    tokens = lambda carry, part, positions, active: self._tokens(
      carry, part[:-1], positions, active, part[-1]
    )
    carry, head_out = tokens(carry, take(0, size - 1), start + span, span < head)

    def one_chunk(carry, index):
      begin = head + index * chunk * size
      valid = index * chunk + jnp.arange(chunk) < whole
      return self._blocks(carry, take(begin, chunk * size), valid)

    carry, body_out = jax.lax.scan(one_chunk, carry, jnp.arange(num_chunks))
    body_out = tuple(
      jnp.moveaxis(a, 0, 1).reshape(b, body, *a.shape[3:]) for a in body_out
    )  # [chunks, B, chunk·block, ...] -> [B, body, ...]
    carry, tail_out = tokens(carry, take(tail, size - 1), start + tail + span, span < t - tail)

    # Each part's outputs over the previous part's junk, in sequence order.
    outputs = []
    for parts in zip(head_out, body_out, tail_out):
      o = jnp.zeros((b, length, *parts[0].shape[2:]), jnp.result_type(*parts))
      for begin, part in zip((0, head, tail), parts):
        o = jax.lax.dynamic_update_slice_in_dim(o, part.astype(o.dtype), begin, 1)
      outputs.append(o[:, :t])
    return self.output(x, *outputs, merge), {**carry, "conv": conv}
