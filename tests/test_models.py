"""The trunk: decoding equals the parallel form, layer patterns, masks, sizes."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import config as config_lib
from attnlab import optim
from attnlab.models import attention, build_model, layer_mixers

from .conftest import REPO


def _model_config(**overrides):
  c = config_lib.base_config().model
  c.update(dict(d_model=32, num_heads=4, mlp_dim=64, vocab_size=50, num_layers=2))
  c.update(overrides)
  return c


def _decode_all(model, tokens, prefill):
  """Prefill `prefill` tokens in one step, then decode the rest one by one."""
  cache = model.init_cache(tokens.shape[0], tokens.shape[1] + 3)
  logits, cache = model.step(tokens[:, :prefill], cache)
  parts = [logits]
  for t in range(prefill, tokens.shape[1]):
    logits, cache = model.step(tokens[:, t : t + 1], cache)
    parts.append(logits)
  assert int(cache["length"]) == tokens.shape[1]
  return jnp.concatenate(parts, axis=1)


CASES = {
  "softmax": dict(attention="softmax"),
  "softmax_gqa_qknorm": dict(attention="softmax", num_kv_heads=2, qk_norm=True),
  "softmax_nope": dict(attention="softmax", rope=False),
  "linear_elu_normalized": dict(attention="linear"),
  "linear_relu_gqa": dict(attention="linear", num_kv_heads=1),
  "linear_identity_rope": dict(attention="linear", rope=True),
  "mixed_pattern": dict(layer_pattern="softmax,linear", num_layers=4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decoding_equals_parallel_logits(case):
  cfg = _model_config(**CASES[case])
  if case == "linear_relu_gqa":
    cfg.mixer.linear.feature_map = "relu"
    cfg.mixer.linear.normalize = False
  if case == "linear_identity_rope":
    cfg.mixer.linear.feature_map = "identity"
    cfg.mixer.linear.normalize = False
    cfg.mixer.linear.chunk_size = 4
  model = build_model(cfg, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 23)))
  parallel = model(tokens)
  for prefill in (1, 9):
    np.testing.assert_allclose(_decode_all(model, tokens, prefill), parallel, atol=2e-5, rtol=2e-5)


def test_layer_pattern_builds_the_named_mixers():
  cfg = _model_config(layer_pattern="linear,linear,softmax", num_layers=6)
  assert layer_mixers(cfg) == ["linear", "linear", "softmax"] * 2
  model = build_model(cfg, nnx.Rngs(0))
  assert [type(b.mixer).__name__ for b in model.blocks][:3] == [
    "LinearAttention",
    "LinearAttention",
    "SoftmaxAttention",
  ]
  with pytest.raises(ValueError, match="does not divide"):
    layer_mixers(_model_config(layer_pattern="linear,softmax", num_layers=3))
  with pytest.raises(ValueError, match="unknown attention variant 'sofmax'"):
    layer_mixers(_model_config(attention="sofmax"))


def test_rope_switch_changes_outputs_and_is_position_sensitive():
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (1, 12)))
  with_rope = build_model(_model_config(rope=True), nnx.Rngs(0))(tokens)
  without = build_model(_model_config(rope=False), nnx.Rngs(0))(tokens)
  assert float(jnp.abs(with_rope - without).max()) > 1e-3
  # The first position has no rotation, so both agree there.
  np.testing.assert_allclose(with_rope[:, 0], without[:, 0], atol=1e-5)


def test_untied_head_and_bf16_compute():
  cfg = _model_config(tie_embeddings=False, dtype="bfloat16")
  model = build_model(cfg, nnx.Rngs(0))
  assert model.lm_head is not None and model.lm_head.kernel[...].dtype == jnp.float32
  logits = model(jnp.zeros((1, 5), jnp.int32))
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


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


def test_registry_lists_variants_and_rejects_duplicates():
  assert {"softmax", "linear"} <= set(attention.names())
  with pytest.raises(ValueError, match="registered twice"):
    attention.registry.register("softmax", options={}, uses_rope=True)(object)


def _load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_softmax_1b_parameter_count():
  config = _load_config("softmax_1b")
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
