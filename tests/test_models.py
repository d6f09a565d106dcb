"""The trunk: decoding equals the parallel form, layer patterns, masks, sizes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlab import config as config_lib
from attnlab import generate, optim, trainer
from attnlab.models import attention, build_model, layer_mixers, layers

from .conftest import MODEL_CASES, PACKED_MIXERS, forward, load_config, packed_model


def _model_config(**overrides):
  c = config_lib.base_config().model
  c.update(dict(d_model=32, num_heads=4, mlp_dim=64, vocab_size=50, num_layers=2))
  c.update(overrides)
  return c


# One jitted step for every call, so the one-token decode compiles once per model shape.
_step = nnx.jit(lambda model, tokens, cache: model.step(tokens, cache))


def _decode_all(model, tokens, prefill):
  """Prefill `prefill` tokens in one step, then decode the rest one by one."""
  cache = model.init_cache(tokens.shape[0], tokens.shape[1] + 3)
  step = _step
  logits, cache = step(model, tokens[:, :prefill], cache)
  parts = [logits]
  for t in range(prefill, tokens.shape[1]):
    logits, cache = step(model, tokens[:, t : t + 1], cache)
    parts.append(logits)
  assert int(cache["length"]) == tokens.shape[1]
  return jnp.concatenate(parts, axis=1)


def _case_config(case):
  trunk, options = MODEL_CASES[case]
  cfg = _model_config(**trunk)
  for variant, values in options.items():
    cfg.mixer[variant].update(values)
  return cfg


def _randomize_temperatures(model):
  """SSA starts as vanilla attention; give its temperatures real values."""
  rng = np.random.default_rng(7)
  for block in [model.blocks] if model.scan_layers else model.blocks:  # stacked when scanned
    for name in ("ssa_u_q", "ssa_u_v"):
      if hasattr(block.mixer, name):
        param = getattr(block.mixer, name)
        param[...] = jnp.asarray(rng.normal(size=param.shape), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_decoding_equals_parallel_logits(case):
  model = build_model(_case_config(case), nnx.Rngs(0))
  _randomize_temperatures(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 23)))
  parallel = forward(model, tokens)
  for prefill in (1, 9):
    np.testing.assert_allclose(_decode_all(model, tokens, prefill), parallel, atol=2e-5, rtol=2e-5)


def test_nats_l_case_has_mixed_block_types():
  """Guards the decoding test above: it must exercise both block types."""
  model = build_model(_case_config("nats_l"), nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 23)))
  block = model.blocks[0]
  _, hard = block.mixer.block_types(block.attn_norm(model.embed(tokens)))
  attention_typed = hard[:, :5, :, 0]  # the complete blocks
  assert 0 < float(attention_typed.mean()) < 1


def _nats_l_prefill_model(num_layers=2, **options):
  """The nats_l case (blocks of 4) with 2-block prefill chunks, so prompts span several."""
  cfg = _case_config("nats_l")
  cfg.num_layers = num_layers
  cfg.mixer.nats_l.update(dict(prefill_chunk_blocks=2, **options))
  return build_model(cfg, nnx.Rngs(0))


def _run_steps(model, tokens, splits, max_len):
  """Feeds tokens in consecutive steps of the given sizes -> (logits, cache)."""
  cache = model.init_cache(tokens.shape[0], max_len)
  parts, begin = [], 0
  for size in splits:
    logits, cache = _step(model, tokens[:, begin : begin + size], cache)
    parts.append(logits)
    begin += size
  return jnp.concatenate(parts, axis=1), cache


def _assert_same_nats_l_cache(got, want, length, block):
  """Cache equality up to float rounding (entries are O(1) or smaller); KV rows are
  compared where they are live
  (slots past a head's count are scratch the token path leaves behind)."""
  for layer_got, layer_want in zip(got["layers"], want["layers"], strict=True):
    for key in layer_want:
      if key in ("k", "v"):
        continue
      for a, b in zip(jax.tree.leaves(layer_got[key]), jax.tree.leaves(layer_want[key])):
        if a.dtype in (jnp.int32, jnp.bool_):
          np.testing.assert_array_equal(a, b, err_msg=key)
        else:
          np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=key)
    count = np.asarray(layer_want["num_attn_blocks"])  # [B, Ha]
    slot = np.arange(layer_want["k"].shape[1])[None, :, None, None]
    row = np.arange(block)[None, None, :, None]
    live = (slot < count[:, None, None]) | ((slot == count[:, None, None]) & (row < length % block))
    for key in ("k", "v"):
      np.testing.assert_allclose(
        np.where(live[..., None], layer_got[key], 0.0),
        np.where(live[..., None], layer_want[key], 0.0),
        rtol=1e-5, atol=1e-5, err_msg=key,
      )  # fmt: skip


# Blocks of 4, chunks of 2 blocks. [3, 20]: a prompt inside one block, then head tokens to
# the boundary, two chunks and tail tokens; [2, 1, 13, 4]: head-only steps, then chunks
# ending on a boundary, then a step that is one aligned chunk.
@pytest.mark.parametrize(
  "splits", [[3, 20], [2, 1, 13, 4]], ids=["unaligned-start-and-end", "several-prefills"]
)
def test_nats_l_chunked_prefill_equals_token_steps_and_parallel(splits):
  """A multi-token step runs head tokens, chunks of whole blocks, tail tokens; the
  logits and the cache it leaves equal the token-by-token path's, and decoding
  continues identically."""
  model = _nats_l_prefill_model()
  prompt, decoded = sum(splits), 3
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, prompt + decoded)))
  parallel = forward(model, tokens)
  max_len = prompt + decoded + 2
  chunked, cache = _run_steps(model, tokens[:, :prompt], splits, max_len)
  stepped, want = _run_steps(model, tokens[:, :prompt], [1] * prompt, max_len)
  scale = float(jnp.abs(parallel).max())
  np.testing.assert_allclose(chunked, parallel[:, :prompt], rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(chunked, stepped, rtol=1e-5, atol=1e-5 * scale)
  _assert_same_nats_l_cache(cache, want, prompt, 4)
  for t in range(prompt, prompt + decoded):
    logits, cache = _step(model, tokens[:, t : t + 1], cache)
    np.testing.assert_allclose(logits[:, 0], parallel[:, t], rtol=1e-5, atol=1e-5 * scale)


def test_nats_l_case_routes_both_ways_over_the_prefill_prompts():
  """Guards the prefill test: its prompts hold attention- and delta-typed blocks."""
  model = _nats_l_prefill_model()
  _, cache = _run_steps(
    model, jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 23))), [23], 30
  )
  counts = np.stack([np.asarray(layer["num_attn_blocks"]) for layer in cache["layers"]])
  assert 0 < counts.min() and counts.max() < 5  # 5 complete blocks


@pytest.mark.slow
def test_nats_l_decode_cache_sized_by_routing_and_overflow():
  """decode_attn_blocks caps each head's attention-typed blocks in the cache: enough
  gives the full cache's tokens from smaller arrays; too few raises."""
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 13)))
  new, max_len = 19, 32  # 8 blocks: the worst-case cache has 8 slots per head
  full = _nats_l_prefill_model(num_layers=1)  # whose heads route few blocks to attention
  want = generate.generate(full, prompt, max_new_tokens=new)
  _, cache = _run_steps(full, want, [13] + [1] * new, max_len)
  most = max(int(np.asarray(layer["num_attn_blocks"]).max()) for layer in cache["layers"])
  capped = _nats_l_prefill_model(num_layers=1, decode_attn_blocks=most)
  slots = capped.init_cache(2, max_len)["layers"][0]["k"].shape[1]
  assert slots == most + 1 < full.init_cache(2, max_len)["layers"][0]["k"].shape[1]
  np.testing.assert_array_equal(generate.generate(capped, prompt, max_new_tokens=new), want)
  short = _nats_l_prefill_model(num_layers=1, decode_attn_blocks=most - 1)
  with pytest.raises(ValueError, match=r"model\.mixer\.nats_l\.decode_attn_blocks"):
    generate.generate(short, prompt, max_new_tokens=new)
  with pytest.raises(ValueError, match="decode_attn_blocks=-1"):
    _nats_l_prefill_model(decode_attn_blocks=-1)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["softmax", "nats_l", "soft"])
def test_scanned_layers_equal_unrolled_layers(variant):
  """scan_layers changes only how the layers are stored and compiled."""
  cfg = _model_config(attention=variant, num_layers=3)
  cfg.mixer.nats_l.block_size = 4
  unrolled = build_model(cfg, nnx.Rngs(0))
  cfg.scan_layers = True
  scanned = build_model(cfg, nnx.Rngs(1))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in unrolled.blocks])
  nnx.update(scanned.blocks, stacked)
  for name in ("embed", "final_norm"):
    nnx.update(getattr(scanned, name), nnx.state(getattr(unrolled, name)))
  assert jax.tree.leaves(nnx.state(scanned.blocks, nnx.Param))[0].shape[0] == 3

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 11)))
  want = forward(unrolled, tokens)
  np.testing.assert_allclose(forward(scanned, tokens), want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(_decode_all(scanned, tokens, 5), want, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(scanned.layer(2)(want[..., :32]), unrolled.blocks[2](want[..., :32]))
  # Sown per-layer statistics keep their layer names; nothing is sown unless asked.
  for model in (scanned, unrolled):
    assert not nnx.state(model, nnx.Intermediate)
    model.set_attributes(collect_statistics=True, raise_if_not_found=False)
    model(tokens)
  stats, want_stats = trainer.layer_statistics(scanned), trainer.layer_statistics(unrolled)
  assert stats.keys() == want_stats.keys()
  if variant == "nats_l":
    assert sorted(stats) == [f"layer_{i}/attn_block_fraction" for i in range(3)]
  for key in stats:
    np.testing.assert_allclose(stats[key], want_stats[key], atol=1e-6)
  with pytest.raises(ValueError, match="same variant"):
    build_model(_model_config(layer_pattern="softmax,linear", scan_layers=True), nnx.Rngs(0))


def test_layer_pattern_builds_the_named_mixers():
  cfg = _model_config(layer_pattern="linear,linear,softmax", num_layers=6)
  assert layer_mixers(cfg) == ["linear", "linear", "softmax"] * 2
  model = build_model(cfg, nnx.Rngs(0))
  assert [type(b.mixer).__name__ for b in model.blocks] == [
    "LinearAttention",
    "LinearAttention",
    "SoftmaxAttention",
  ] * 2
  with pytest.raises(ValueError, match="does not divide"):
    layer_mixers(_model_config(layer_pattern="linear,softmax", num_layers=3))
  with pytest.raises(ValueError, match="unknown attention variant 'sofmax'"):
    layer_mixers(_model_config(attention="sofmax"))


@pytest.mark.slow
def test_rope_switch_changes_outputs_and_is_position_sensitive():
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (1, 12)))
  with_rope = build_model(_model_config(rope=True), nnx.Rngs(0))(tokens)
  without = build_model(_model_config(rope=False), nnx.Rngs(0))(tokens)
  assert float(jnp.abs(with_rope - without).max()) > 1e-3
  # The first position has no rotation, so both agree there.
  np.testing.assert_allclose(with_rope[:, 0], without[:, 0], atol=1e-5)


def test_partial_rotary_rotates_only_the_leading_dims():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 6, 2, 8)), jnp.float32)
  positions = jnp.arange(6)
  full = layers.apply_rope(x, positions, 100.0)
  half = layers.apply_rope(x, positions, 100.0, fraction=0.5)
  np.testing.assert_array_equal(half[..., 4:], x[..., 4:])  # position-free dims
  np.testing.assert_allclose(half[..., :4], layers.apply_rope(x[..., :4], positions, 100.0))
  # Rotations preserve norms.
  np.testing.assert_allclose(jnp.linalg.norm(full, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  with pytest.raises(ValueError, match="rotates no dims"):
    layers.apply_rope(x, positions, 100.0, fraction=0.1)


@pytest.mark.slow
def test_untied_head_and_bf16_compute():
  cfg = _model_config(tie_embeddings=False, dtype="bfloat16")
  model = build_model(cfg, nnx.Rngs(0))
  assert model.lm_head is not None and model.lm_head.kernel[...].dtype == jnp.float32
  assert build_model(_model_config(), nnx.Rngs(0)).lm_head is None  # tied by default
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 50, (1, 5)))
  logits = model(tokens)
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
  # The same parameters computing in float32: bf16 rounding shows, within bf16's precision.
  cfg.dtype = "float32"
  f32 = build_model(cfg, nnx.Rngs(0))(tokens)
  rel = float(jnp.abs(logits - f32).max() / jnp.abs(f32).max())
  assert 1e-4 < rel < 5e-2, rel


def test_weight_decay_mask_exempts_norms_and_biases():
  model = build_model(_model_config(qk_norm=True), nnx.Rngs(0))
  params = nnx.state(model)
  mask = optim.decay_mask(params)
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = [k for k, m in flat.items() if m]
  exempt = [k for k, m in flat.items() if not m]
  assert all("scale" in k for k in exempt) and len(exempt) == 2 * 2 + 2 * 2 + 1
  assert any("embedding" in k for k in decayed) and any(
    "mixer" in k and "kernel" in k for k in decayed
  )
  # The trunk has no biases; a bias (by name, or any vector) is exempt too.
  dense = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3), "gain": jnp.ones(3)}
  assert optim.decay_mask({"dense": dense}) == {
    "dense": {"kernel": True, "bias": False, "gain": False}
  }
  assert optim.decay_mask({"bias": jnp.ones((2, 3))}) == {"bias": False}


def test_weight_decay_mask_exempts_delta_decay_parameters():
  model = build_model(_model_config(layer_pattern="gated_deltanet,nats_l"), nnx.Rngs(0))
  mask = optim.decay_mask(nnx.state(model, nnx.Param), attention.registry.no_decay_names())
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  for name in ("A_log", "dt_bias"):
    entries = [m for k, m in flat.items() if name in k]
    assert len(entries) == 2 and not any(entries), name
  for name in ("q_conv", "scorer", "merge", "a_proj", "g_proj"):
    assert any(m for k, m in flat.items() if name in k), name


@pytest.mark.slow
def test_nats_l_straight_through_gradient_reaches_the_scorer():
  cfg = _case_config("nats_l")
  model = build_model(cfg, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 23)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    return jnp.mean(nnx.merge(graphdef, params, rest)(tokens) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  scorer = grads["blocks"][0]["mixer"]["scorer"]["kernel"][...]
  assert bool(jnp.isfinite(scorer).all()) and float(jnp.abs(scorer).max()) > 1e-6


@pytest.mark.slow
def test_nats_l_routing_gradient_matches_finite_differences_of_a_soft_gate(x64):
  """Both options' routing gradients are d(loss)/d(gate) of a soft gate at its
  hard value, unscaled (official kernels since upstream 72924be), through the
  softmax straight-through Jacobian. The delta option's includes the decay of
  each write to the block end; g is far from 0 here so that matters."""
  from attnlab import ops
  from attnlab.models.attention import nats_l

  b, t, size, heads, group, dk, dv = 1, 14, 4, 2, 2, 4, 3
  n = -(-t // size)
  rng = np.random.default_rng(3)

  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape))

  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  delta = (
    unit(normal(b, t, heads, dk)),
    unit(normal(b, t, heads, dk)),
    normal(b, t, heads, dv),
    -jnp.asarray(rng.uniform(0.1, 0.6, (b, t, heads))),
    jnp.asarray(rng.uniform(0.2, 0.9, (b, t, heads))),
  )
  attn = (normal(b, t, heads * group, dk), normal(b, t, heads * group, dk))
  attn += (normal(b, t, heads * group, dv),)
  w_delta, w_attn = normal(b, t, heads, dv), normal(b, t, heads * group, dv)
  logits = normal(b, n, heads, 2)

  def loss_of_gates(write, visible, implementation):
    o_delta = ops.block_gated_delta_rule(
      *delta, write, block_size=size, implementation=implementation
    )
    o_attn = ops.block_sparse_softmax(
      *attn, jnp.repeat(visible, group, axis=2), block_size=size, implementation=implementation
    )
    return jnp.sum(o_delta * w_delta) + jnp.sum(o_attn * w_attn)

  def loss(logits):
    gates, _ = nats_l.straight_through_types(logits)
    return loss_of_gates(gates[..., nats_l.DELTA], gates[..., nats_l.ATTENTION], "xla")

  got = jax.grad(loss)(logits)

  _, hard = nats_l.straight_through_types(logits)
  assert 0 < float(hard[:, :-1, :, nats_l.ATTENTION].mean()) < 1  # both options exercised
  reference = jax.jit(functools.partial(loss_of_gates, implementation="reference"))
  eps, fd = 1e-6, np.zeros(hard.shape)
  for index in np.ndindex(*hard.shape):
    bump = jnp.zeros(hard.shape).at[index].set(eps)
    plus, minus = hard + bump, hard - bump
    fd[index] = (
      reference(plus[..., 1], plus[..., 0]) - reference(minus[..., 1], minus[..., 0])
    ) / (2 * eps)
  for option in (nats_l.ATTENTION, nats_l.DELTA):  # each chosen somewhere, with real gradient
    chosen = np.asarray(hard[:, :-1, :, option]) == 1
    assert np.abs(fd[:, :-1, :, option][chosen]).max() > 1e-2
  seen = np.asarray(hard) * fd  # only the chosen option's gradient
  p = np.asarray(jax.nn.softmax(logits))
  expected = p * (seen - np.sum(p * seen, -1, keepdims=True))
  # The estimator's softmax runs in float32 (its logits are cast), hence 1e-5;
  # the old 1/block_size rule is off by a factor 4 here.
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_registry_lists_variants_and_rejects_duplicates():
  assert {"softmax", "linear", "gated_deltanet", "nats_l", "lucid", "softplus", "ssa"} <= set(
    attention.names()
  )
  with pytest.raises(ValueError, match="registered twice"):
    attention.registry.register(
      "softmax", uses_rope=True, analysis=attention.get("softmax").analysis
    )(object)


def test_softmax_1b_parameter_count():
  config = load_config("softmax_1b")
  abstract = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
  m = config.model
  # Independent count: embeddings + per-layer (q, k, v, o, 3 MLP mats, 2 norms) + final norm.
  hd = m.d_model // m.num_heads
  per_layer = (
    m.d_model * m.num_heads * hd * 2
    + m.d_model * m.num_kv_heads * hd * 2
    + 3 * m.d_model * m.mlp_dim
    + 2 * m.d_model
  )
  expected = (
    m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.num_layers * per_layer + m.d_model
  )
  assert count == expected
  assert 0.95e9 < count < 1.25e9, count


def _delta_layer_params(d, heads, head_k, expand_v, conv):
  key, value = heads * head_k, int(heads * head_k * expand_v)
  projections = d * (2 * key + 2 * value) + value * d + 2 * d * heads  # q k v g o, a b
  return projections + conv * (2 * key + value) + 2 * heads  # convs, A_log, dt_bias


def _count(config):
  abstract = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))


def test_gated_deltanet_1b_parameter_count():
  m = load_config("gated_deltanet_1b").model
  layer = (
    _delta_layer_params(m.d_model, 6, 256, 2, 4)
    + 2 * 256  # output RMSNorm over a value head (head_v = 2 * 256)
    + 3 * m.d_model * m.mlp_dim
    + 2 * m.d_model
  )
  expected = 2 * m.vocab_size * m.d_model + m.num_layers * layer + m.d_model
  assert _count(load_config("gated_deltanet_1b")) == expected
  assert 1.3e9 < expected < 1.45e9, expected


@pytest.mark.slow
def test_nats_l_340m_parameter_count_and_layer_pattern():
  config = load_config("nats_l_340m")
  m = config.model
  names = layer_mixers(m)
  assert [i for i, n in enumerate(names) if n == "nats_l"] == [3, 7, 11, 15, 19, 20]
  d, heads, head_k, attn_heads = m.d_model, 6, 128, 12
  key, value = heads * head_k, 2 * heads * head_k
  shared = 3 * d * m.mlp_dim + 2 * d
  gdn = _delta_layer_params(d, heads, head_k, 2, 4) + 2 * head_k + shared  # + o_norm
  nats = (
    _delta_layer_params(d, heads, head_k, 2, 4)
    + d * 2 * heads  # block scorer
    + key * 2 * attn_heads  # merge weights from q
    + 2 * (key // attn_heads)
    + 2 * (value // attn_heads)  # qk norms, two output norms
    + shared
  )
  expected = 2 * m.vocab_size * d + 15 * gdn + 6 * nats + d
  assert _count(config) == expected
  assert 0.33e9 < expected < 0.4e9, expected


@pytest.mark.slow
def test_ssa_extra_parameters_stay_under_half_a_percent_and_use_their_own_lr():
  def layer_params(attention):
    model = build_model(
      _model_config(attention=attention, d_model=64, num_heads=2, mlp_dim=128), nnx.Rngs(0)
    )
    return sum(x.size for x in jax.tree.leaves(nnx.state(model.blocks[0], nnx.Param))), model

  base, _ = layer_params("softmax")
  with_ssa, model = layer_params("ssa")
  extra = with_ssa - base
  assert extra == 1 + (2 + 2) * 32  # α plus one vector per query and kv head
  assert extra / base < 0.005, extra / base
  params = nnx.state(model, nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(
    optim.temperature_mask(params, attention.registry.temperature_names())
  )[0]
  chosen = sorted(jax.tree_util.keystr(p) for p, m in flat if m)
  # Only the position slope α (the official recipe's β); u trains at the base lr.
  assert len(chosen) == 2 and all("ssa_alpha" in k for k in chosen)
  # The temperature group moves at its own learning rate.
  cfg = config_lib.base_config().optim
  cfg.update(dict(lr=1e-3, temperature_lr=1e-1, warmup_steps=0, weight_decay=0.0))
  tx = optim.make_optimizer(cfg, total_steps=10, temperature=attention.registry.temperature_names())
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  layer = updates["blocks"][0]["mixer"]
  np.testing.assert_allclose(layer["ssa_alpha"][...], -1e-1, rtol=1e-3)
  np.testing.assert_allclose(layer["out"]["kernel"][...].max(), -1e-3, rtol=1e-3)


# Small enough that every variant's options fit (blocks and chunks of 4 tokens).
_LOOP_OPTIONS = {
  "gated_deltanet": dict(chunk_size=4),
  "nats_l": dict(block_size=4),
  "lucid": dict(block_size=4),
  "soft": dict(num_landmarks=4, chunk_size=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", attention.names())
def test_plain_nnx_training_loop_compiles_once(variant):
  """The loop the flax docs teach: nnx.jit over nnx.value_and_grad and
  nnx.Optimizer.update. A mixer that sowed on every call would grow the
  model's state each step and retrace every step (issue 17)."""
  cfg = _model_config(
    attention=variant, d_model=16, num_heads=2, mlp_dim=32, vocab_size=16, num_layers=1
  )
  for name, values in _LOOP_OPTIONS.items():
    cfg.mixer[name].update(values)
  model = build_model(cfg, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def train_step(model, optimizer, tokens):
    traces.append(1)  # runs only while tracing

    def loss_fn(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(0)
  structure = jax.tree.structure(nnx.state(model))
  losses = [
    float(train_step(model, optimizer, jnp.asarray(rng.integers(0, 16, (2, 9))))) for _ in range(3)
  ]
  assert len(traces) == 1, f"{variant}: traced {len(traces)} times in 3 steps"
  assert jax.tree.structure(nnx.state(model)) == structure  # nothing accumulates
  assert all(np.isfinite(losses))


@pytest.mark.slow
@pytest.mark.parametrize("attention,mixer", PACKED_MIXERS)
def test_packed_prompt_decodes_each_document_as_the_parallel_form(attention, mixer):
  """Prefill a packed prompt (segment_ids) in two chunks, then decode without them:
  every step's logits equal the parallel form's on the packed row, whose documents
  are each what they compute alone (tests/test_data.py). At the split row 0 begins a
  document and row 1 continues one (mid-block for the non-NAtS-L variants)."""
  model = packed_model(attention, **mixer)
  _randomize_temperatures(model)
  # NAtS-L's documents start on block boundaries (4), as in training.
  if attention == "nats_l":
    lengths, split = [(8, 4, 16), (8, 20)], 12
  else:
    lengths, split = [(6, 5, 11), (9, 13)], 11
  seg = jnp.asarray(np.stack([np.repeat(np.arange(len(ls)) + 5, ls) for ls in lengths]), jnp.int32)
  total, prompt = seg.shape[1], seg.shape[1] - 4  # the last document's last 4 are decoded
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 50, seg.shape), jnp.int32)
  parallel = forward(model, tokens, seg)
  step = nnx.jit(lambda m, tokens, cache, seg: m.step(tokens, cache, seg))
  cache = model.init_cache(2, total)
  first, cache = step(model, tokens[:, :split], cache, seg[:, :split])
  rest, cache = step(model, tokens[:, split:prompt], cache, seg[:, split:prompt])
  parts = [first, rest]
  for t in range(prompt, total):
    logits, cache = _step(model, tokens[:, t : t + 1], cache)
    parts.append(logits)
  np.testing.assert_allclose(jnp.concatenate(parts, 1), parallel, atol=2e-5, rtol=2e-5)
  # Without segment ids the documents mix: the test can tell them apart.
  assert float(jnp.max(jnp.abs(forward(model, tokens) - parallel))) > 1e-3


def test_generate_batches_prompts_of_different_lengths_exactly():
  """A ragged batch as packed prompts (filler before the shorter prompt, as its own
  document) generates, row by row, what each prompt generates alone."""
  model = build_model(_model_config(attention="softmax", canon_conv=3), nnx.Rngs(0))
  rng = np.random.default_rng(4)
  long, short = rng.integers(1, 50, 9), rng.integers(1, 50, 5)
  prompt = jnp.asarray(np.stack([long, np.concatenate([np.zeros(4, int), short])]), jnp.int32)
  seg = jnp.asarray([[1] * 9, [0] * 4 + [1] * 5], jnp.int32)
  batched = generate.generate(model, prompt, max_new_tokens=5, segment_ids=seg)
  for row, alone in enumerate((long, short)):
    want = generate.generate(model, jnp.asarray(alone[None], jnp.int32), max_new_tokens=5)
    np.testing.assert_array_equal(batched[row, -5:], want[0, -5:])
  # Without segment ids the filler is context, and the short row's tokens change.
  mixed = generate.generate(model, prompt, max_new_tokens=5)
  assert not np.array_equal(mixed[1, -5:], batched[1, -5:])
  with pytest.raises(ValueError, match="segment_ids must match"):
    generate.generate(model, prompt, max_new_tokens=2, segment_ids=seg[:, :3])
