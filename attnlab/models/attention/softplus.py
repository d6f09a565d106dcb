"""Softplus attention with re-weighting (Gao & Spratling, 2026): LSSA / LSSAR.

The softmax map is replaced by softplus of log-scaled cosine scores with row
L1 normalisation (LSSA); `power=p` adds the ReLU(A·i − O)^p sharpening
(LSSAR; p = 15 is the paper's choice for length extrapolation, p = 3 for
in-length quality; 0 means plain LSSA). The default trains LSSA: the paper
calls the re-weighting fine-tuning-free and applies it to an LSSA-trained
model without retraining, so p is an evaluation-time option
(`python -m attnlab.evaluate --config.model.mixer.softplus.power=15`); trained
from scratch with p = 15 the model does not learn recall here (MQAR 0.216 at
600 steps, benchmarks/results). No new parameters; the projections,
RoPE (on by default, as in the paper's GPT-2 + RoPE backbone) and the KV
cache are the softmax mixer's. The row index i is the absolute position, so
decoding reproduces the parallel form (in packed rows, the position within
the document).
"""

from __future__ import annotations

import jax

from attnlab import ops
from attnlab.models.attention import common_form, registry, softmax


def _forms(mixer: SoftplusAttention, x: jax.Array) -> common_form.Forms:
  """Softmax attention's kernel form with the softplus kernel (which has no logit scale)."""
  form = softmax.kernel_form(mixer, x)
  return {"main": form.replace(kernel="softplus", power=mixer.power)}


@registry.register(
  "softplus",
  uses_rope=True,
  analysis=common_form.Adapter(
    forms=_forms, readout=softmax.output_readout, hooks=softmax.ANALYSIS.hooks
  ),
)
class SoftplusAttention(softmax.SoftmaxAttention):
  """LSSA / LSSAR: [B, T, d_model] -> [B, T, d_model]; KV cache."""

  def __init__(self, model, options, *, use_rope, rngs):
    super().__init__(model, options, use_rope=use_rope, rngs=rngs)
    if options.power < 0:
      raise ValueError(f"softplus: power must be >= 0 (0 = LSSA), got {options.power}")
    self.power = options.power or None

  def attend(self, q, k, v, logit_scale=None, segment_ids=None):
    del logit_scale  # no temperature in softplus attention
    return ops.softplus_attention(
      q, k, v, power=self.power, segment_ids=segment_ids, implementation=self.implementation
    )

  def attend_cached(self, q, k_cache, v_cache, length, logit_scale=None, segment_ids=None):
    del logit_scale
    return ops.softplus_attention_cached(
      q, k_cache, v_cache, length, power=self.power, segment_ids=segment_ids,
      implementation=self.implementation,
    )  # fmt: skip
