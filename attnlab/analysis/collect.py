"""Reading the common form out of the real layers.

Every registered variant has an adapter: `forms(mixer, x)` builds the layer's
forms from the mixer's own hooks (after its norms, convs and RoPE, with its
real scales), and `readout(mixer, x, outputs)` maps the forms' outputs
through the rest of the layer (output norms, gates, projections), so that
readout(run_recurrent(forms)) reproduces `mixer(x)`. NAtS-L is the direct sum
of two parts, 'delta' and 'attention'; every other variant has one part,
'main'.

The adapters reuse the mixers' own pieces (`project`/`values`, `DeltaInputs`,
linear attention's `_features`, NAtS-L's `_views`/`block_types`/`_output`,
SOFT's Nyström features) so that no projection is re-implemented here; the
identity tests catch any drift. New variants call
`register_adapter(name, Adapter(...))`; `capture_layers` skips (and reports)
layers whose variant has no adapter.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.analysis import forms as F
from attnlab.models import layers
from attnlab.models.attention import gated_deltanet, nats_l, softmax

Forms = dict[str, F.Form]


@dataclasses.dataclass(frozen=True)
class Adapter:
  """forms(mixer, x [B,T,d_model]) -> {part: form};
  readout(mixer, x, {part: y [B,H,T,dv]}) -> [B, T, d_model]."""

  forms: Callable[[nnx.Module, jax.Array], Forms]
  readout: Callable[[nnx.Module, jax.Array, dict[str, jax.Array]], jax.Array]


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str, adapter: Adapter) -> Adapter:
  """Registers the adapter of attention variant `name` (its registry name)."""
  ADAPTERS[name] = adapter
  return adapter


def _dtype(x: jax.Array) -> jnp.dtype:
  return jnp.result_type(jnp.float32, x.dtype)


def _heads_first(a: jax.Array, dtype) -> jax.Array:
  """[B, T, H, ...] -> [B, H, T, ...] in the analysis dtype."""
  return jnp.swapaxes(a, 1, 2).astype(dtype)


def _time_first(y: jax.Array) -> jax.Array:
  """[B, H, T, dv] -> [B, T, H, dv]."""
  return jnp.swapaxes(y, 1, 2)


# Softmax family: softmax, SSA, LUCID, softplus --------------------------------------


def _softmax_family_forms(kernel: str) -> Callable[[nnx.Module, jax.Array], Forms]:
  def build(mixer: softmax.SoftmaxAttention, x: jax.Array) -> Forms:
    dt = _dtype(x)
    b, t, _ = x.shape
    q, k, v, logit_scale = mixer.project(x, jnp.arange(t))
    values = mixer.values(k, v)
    group = q.shape[2] // k.shape[2]
    repeat = lambda a: jnp.repeat(a, group, axis=2)
    scale = jnp.full(q.shape[:3], q.shape[-1] ** -0.5, dt)
    if logit_scale is not None and kernel == "softmax":
      scale = scale * logit_scale.astype(dt)
    value_map = None
    if type(mixer).values is not softmax.SoftmaxAttention.values:
      # The values are a linear map of v (LUCID: L⁻¹ v); read it off the
      # mixer's own `values` applied to the identity.
      eye = jnp.broadcast_to(jnp.eye(t, dtype=v.dtype)[None, :, None], (b, t, k.shape[2], t))
      value_map = _heads_first(repeat(mixer.values(k, eye)), dt)
    power = getattr(mixer, "power", None) if kernel == "softplus" else None
    form = F.KernelForm(
      q=_heads_first(q, dt),
      k=_heads_first(repeat(k), dt),
      scale=jnp.swapaxes(scale, 1, 2),
      u=_heads_first(repeat(values), dt),
      value_map=value_map,
      kernel=kernel,
      power=power,
    )
    return {"main": form}

  return build


def _out_readout(mixer: nnx.Module, x: jax.Array, outputs: dict[str, jax.Array]) -> jax.Array:
  b, t, _ = x.shape
  o = _time_first(outputs["main"]).astype(mixer.dtype)
  return mixer.out(o.reshape(b, t, -1))


for _name in ("softmax", "ssa", "lucid"):
  register_adapter(_name, Adapter(_softmax_family_forms("softmax"), _out_readout))
register_adapter("softplus", Adapter(_softmax_family_forms("softplus"), _out_readout))


# Linear attention -------------------------------------------------------------------


def normalized_linear_form(
  q: jax.Array, k: jax.Array, v: jax.Array, *, floor: float | None = None, positive: bool = False
) -> F.ScalarForm:
  """DSF form of normalised linear attention over features q, k [B,H,T,N], v [B,H,T,dv].

  The normaliser η_t = q_t·Σ_{s≤t} k_s (clamped below at `floor` if given)
  goes into the state: λ_t = η_{t−1}/η_t, b_t = k_t/η_t, c_t = q_t, so the
  state is h_t = Σ_{s≤t} k_s u_sᵀ / η_t. `positive` promises η_t > 0.
  """
  eta = jnp.einsum("bhtd,bhtd->bht", q, jnp.cumsum(k, axis=2))
  if floor is not None:
    eta = jnp.maximum(eta, floor)
  log_eta = jnp.log(jnp.abs(eta))
  previous = jnp.pad(log_eta, ((0, 0), (0, 0), (1, 0)))[..., :-1]
  log_lam = (previous - log_eta).at[..., 0].set(0.0)
  sign = None
  if not positive:
    previous_sign = jnp.pad(jnp.sign(eta), ((0, 0), (0, 0), (1, 0)), constant_values=1.0)
    sign = jnp.sign(eta) * previous_sign[..., :-1]
  return F.ScalarForm(log_lam, k / eta[..., None], q, v, sign)


def _linear_forms(mixer: nnx.Module, x: jax.Array) -> Forms:
  """Normalised: see `normalized_linear_form`; unnormalised: λ_t = 1, c_t = φ(q_t)/√D."""
  dt = _dtype(x)
  q, k, v = mixer._features(x, jnp.arange(x.shape[1]))
  q, k, v = (_heads_first(a, dt) for a in (q, k, v))
  if not mixer.normalize:
    return {"main": F.ScalarForm(jnp.zeros(q.shape[:3], dt), k, q * q.shape[-1] ** -0.5, v)}
  # Non-negative feature maps keep η_t > 0.
  positive = mixer.feature_map in ("elu1", "relu")
  return {"main": normalized_linear_form(q, k, v, positive=positive)}


register_adapter("linear", Adapter(_linear_forms, _out_readout))


# SOFT: linear attention over Nyström Gaussian-kernel features ---------------------


def _soft_forms(mixer: nnx.Module, x: jax.Array) -> Forms:
  """Features P A⁺ (query side) and P (key side) from the op's own Nyström map;
  state [m, dv] per head. The causal conv skip on v is outside the form."""
  from attnlab.ops.soft import api as soft_api
  from attnlab.ops.soft import xla as soft_xla

  dt = _dtype(x)
  b, t, _ = x.shape
  opts = mixer.options
  q = mixer.q(x).reshape(b, t, mixer.num_heads, mixer.head_dim).astype(dt)
  v = mixer.v(x).reshape(q.shape)
  q_side, k_side = soft_xla.nystrom_features(
    q, mixer.landmarks[...].astype(dt), newton_iters=opts.newton_iters, ridge=opts.ridge
  )
  q_side, k_side, v = (_heads_first(a, dt) for a in (q_side, k_side, v))
  if not opts.normalize:
    return {"main": F.ScalarForm(jnp.zeros(q_side.shape[:3], dt), k_side, q_side, v)}
  floor = inspect.signature(soft_api.soft_attention).parameters["eps"].default
  return {"main": normalized_linear_form(q_side, k_side, v, floor=floor, positive=True)}


def _soft_readout(mixer, x, outputs):
  b, t, _ = x.shape
  o = _time_first(outputs["main"]).reshape(b, t, -1).astype(mixer.dtype)
  if mixer.v_conv is not None:
    o = o + mixer.v_conv(mixer.v(x))[0]
  return mixer.out(o)


register_adapter("soft", Adapter(_soft_forms, _soft_readout))


# Gated DeltaNet ---------------------------------------------------------------------


def _gdn_forms(mixer: gated_deltanet.GatedDeltaNet, x: jax.Array) -> Forms:
  dt = _dtype(x)
  b, t, _ = x.shape
  q, k, v, g, beta, _ = mixer.inputs(x)
  q = layers.l2_normalize(q.reshape(b, t, mixer.heads, mixer.head_k))
  k = layers.l2_normalize(k.reshape(b, t, mixer.heads, mixer.head_k))
  group = mixer.v_heads // mixer.heads  # grouped value heads share q and k
  q, k = (jnp.repeat(a, group, axis=2) for a in (q, k))
  form = F.DeltaForm(
    log_alpha=_heads_first(g, dt),
    beta=_heads_first(beta, dt),
    k=_heads_first(k, dt),
    c=_heads_first(q, dt) * mixer.head_k**-0.5,
    u=_heads_first(v.reshape(b, t, mixer.v_heads, mixer.head_v), dt),
  )
  return {"main": form}


def _gdn_readout(mixer, x, outputs):
  b, t, _ = x.shape
  o = _time_first(outputs["main"]).astype(mixer.dtype)
  gate = None if mixer.g_proj is None else mixer.g_proj(x).reshape(o.shape)
  return mixer.o_proj(gated_deltanet.gated_output_norm(mixer.o_norm, o, gate).reshape(b, t, -1))


register_adapter("gated_deltanet", Adapter(_gdn_forms, _gdn_readout))


# NAtS-L: direct sum of the delta path and the block-sparse softmax path ----------


def _nats_l_forms(mixer: nats_l.NAtSL, x: jax.Array) -> Forms:
  dt = _dtype(x)
  t = x.shape[1]
  (qd, kd, vd, g, beta), (qa, ka, va), _, _ = mixer._views(x, None)
  _, hard = mixer.block_types(x)  # [B, N, H, 2]; the forward pass uses the hard types
  size = mixer.block_size
  block = jnp.arange(t) // size
  complete = (block + 1) * size <= t  # an incomplete last block never writes
  write = hard[..., nats_l.DELTA][:, block] * complete[None, :, None]
  delta = F.DeltaForm(
    log_alpha=_heads_first(g, dt),
    beta=_heads_first(beta, dt),
    k=_heads_first(kd, dt),
    c=_heads_first(qd, dt) * mixer.head_k**-0.5,
    u=_heads_first(vd, dt),
    write=_heads_first(write, dt),
    reset=jnp.arange(t) % size == 0,
  )
  group = mixer.attn_heads // mixer.heads
  key_type = jnp.repeat(hard[..., nats_l.ATTENTION], group, axis=2)[:, block]  # [B, T(key), Ha]
  earlier = block[None, :] < block[:, None]  # [T(query), T(key)]
  same = block[None, :] == block[:, None]
  visible = same[None, None] | (earlier[None, None] & (_heads_first(key_type, dt) > 0)[:, :, None])
  attention = F.KernelForm(
    q=_heads_first(qa, dt),
    k=_heads_first(ka, dt),
    scale=jnp.full((x.shape[0], mixer.attn_heads, t), mixer.attn_k**-0.5, dt),
    u=_heads_first(va, dt),
    visible=visible,
  )
  return {"delta": delta, "attention": attention}


def _nats_l_readout(mixer, x, outputs):
  _, _, merge, _ = mixer._views(x, None)
  o_delta, o_attn = (_time_first(outputs[p]) for p in ("delta", "attention"))
  return mixer._output(x, o_delta, o_attn, merge)


register_adapter("nats_l", Adapter(_nats_l_forms, _nats_l_readout))


# Whole models -----------------------------------------------------------------------


@dataclasses.dataclass
class LayerCapture:
  """One layer's forms on a batch.

  Attributes:
    index: layer index in the trunk.
    variant: registry name of the layer's mixer.
    forms: {part: form} (head-major arrays).
    errors: max |output − production `mixer(x)`| of the recurrent and the
      parallel form, read out through the rest of the layer.
  """

  index: int
  variant: str
  forms: Forms
  errors: dict[str, jax.Array]


def layer_forms(mixer: nnx.Module, variant: str, x: jax.Array) -> Forms:
  """The forms of one mixer on its input x [B, T, d_model]."""
  if variant not in ADAPTERS:
    raise KeyError(f"no analysis adapter for attention variant {variant!r}")
  return ADAPTERS[variant].forms(mixer, x)


def layer_readout(mixer: nnx.Module, variant: str, x: jax.Array, outputs) -> jax.Array:
  """Maps per-part outputs {part: [B,H,T,dv]} through the rest of the layer."""
  return ADAPTERS[variant].readout(mixer, x, outputs)


def form_errors(
  mixer: nnx.Module, variant: str, x: jax.Array, forms: Forms
) -> dict[str, jax.Array]:
  """Max |readout(form output) − mixer(x)| for the recurrent and parallel forms."""
  reference = mixer(x)
  errors = {}
  for name, run in (("recurrent", lambda f: F.run_recurrent(f)[0]), ("parallel", F.run_parallel)):
    outputs = {part: run(form) for part, form in forms.items()}
    y = layer_readout(mixer, variant, x, outputs)
    errors[name] = jnp.max(jnp.abs(y.astype(jnp.float32) - reference.astype(jnp.float32)))
  return errors


def block_mixer_input(block: nnx.Module, x: jax.Array) -> jax.Array:
  """What the block feeds its mixer: the normed residual stream (plus the
  Canon conv where the block has one)."""
  if hasattr(block, "mixer_input"):
    return block.mixer_input(x)[0]
  return block.attn_norm(x)


@nnx.jit(static_argnames=("variant",))
def _capture_layer(block, x, variant):
  """Forms and form errors of block's mixer on its real input, and the block's output."""
  mixer_input = block_mixer_input(block, x)
  forms = layer_forms(block.mixer, variant, mixer_input)
  return forms, form_errors(block.mixer, variant, mixer_input, forms), block(x)


@nnx.jit
def _block(block, x):
  return block(x)


def num_layers(model: nnx.Module) -> int:
  """Number of blocks of a Transformer (scanned or not)."""
  return getattr(model, "num_layers", None) or len(model.blocks)


def model_layer(model: nnx.Module, i: int) -> nnx.Module:
  """Block i of a Transformer; a sliced copy when its layers are scanned."""
  return model.layer(i) if hasattr(model, "layer") else model.blocks[i]


def capture_layers(
  model: nnx.Module, tokens: jax.Array, layers: list[int] | None = None
) -> tuple[list[LayerCapture], list[str]]:
  """Runs the trunk on tokens [B, T] and captures the forms of the chosen layers.

  The residual stream goes through every block exactly as in
  `Transformer.__call__`; each chosen block's mixer sees its real input
  (after the block's RMSNorm and Canon conv).

  Returns:
    (captures, skipped): one LayerCapture per analysed layer, and messages
    for layers skipped because their variant has no adapter.
  """
  count = num_layers(model)
  chosen = set(range(count)) if layers is None else set(layers)
  bad = sorted(i for i in chosen if not 0 <= i < count)
  if bad:
    raise ValueError(f"layers {bad} out of range: the model has {count} layers")
  captures, skipped = [], []
  x = model.embed(tokens)
  for i in range(count):
    block = model_layer(model, i)
    if i in chosen and block.mixer_name in ADAPTERS:
      forms, errors, x = _capture_layer(block, x, block.mixer_name)
      captures.append(LayerCapture(i, block.mixer_name, forms, errors))
      continue
    if i in chosen:
      skipped.append(f"layer {i}: no analysis adapter for {block.mixer_name!r}")
    x = _block(block, x)
  return captures, skipped
