"""Reading the common form out of the real layers of a model.

Every registered variant has an analysis adapter (`common_form.Adapter`),
defined next to its mixer and registered with it in
`attnlab.models.attention.registry`: `forms(mixer, x)` builds the layer's
forms from the mixer's public hooks, and `readout(mixer, x, outputs)` maps
the forms' outputs through the rest of the layer, so that
readout(run_recurrent(forms)) reproduces `mixer(x)`. NAtS-L is the direct sum
of two parts, 'delta' and 'attention'; every other variant has one part,
'main'. This module runs the adapters on a model's layers and measures how
well the forms reproduce them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.analysis import forms as F
from attnlab.models import Transformer
from attnlab.models.attention import registry
from attnlab.models.attention.common_form import Forms


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
  """The forms of one `variant` mixer on its input x [B, T, d_model].

  Raises:
    ValueError: `variant` is not registered (the message names those that are).
  """
  return registry.get(variant).analysis.forms(mixer, x)


def layer_readout(
  mixer: nnx.Module, variant: str, x: jax.Array, outputs: dict[str, jax.Array]
) -> jax.Array:
  """Maps per-part outputs {part: [B,H,T,dv]} through the rest of the layer: [B, T, d_model]."""
  return registry.get(variant).analysis.readout(mixer, x, outputs)


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


@nnx.jit(static_argnames=("variant",))
def _capture_layer(block, x, variant):
  """Forms and form errors of block's mixer on its real input (the normed
  residual stream, plus the Canon conv where the block has one), and the
  block's output."""
  mixer_input = block.mixer_input(x)[0]
  forms = layer_forms(block.mixer, variant, mixer_input)
  return forms, form_errors(block.mixer, variant, mixer_input, forms), block(x)


@nnx.jit
def _block(block, x):
  return block(x)


def capture_layers(
  model: Transformer, tokens: jax.Array, layers: list[int] | None = None
) -> list[LayerCapture]:
  """Runs the trunk on tokens [B, T] and captures the forms of the chosen layers.

  The residual stream goes through every block exactly as in
  `Transformer.__call__`; each chosen block's mixer sees its real input
  (after the block's RMSNorm and Canon conv).

  Returns:
    One LayerCapture per chosen layer, in layer order.
  """
  count = model.num_layers
  chosen = set(range(count)) if layers is None else set(layers)
  bad = sorted(i for i in chosen if not 0 <= i < count)
  if bad:
    raise ValueError(f"layers {bad} out of range: the model has {count} layers")
  captures = []
  x = model.embed(tokens)
  for i in range(count):
    block = model.layer(i)
    if i in chosen:
      forms, errors, x = _capture_layer(block, x, block.mixer_name)
      captures.append(LayerCapture(i, block.mixer_name, forms, errors))
    else:
      x = _block(block, x)
  return captures
