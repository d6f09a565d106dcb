"""Flash-style causal attention kernels shared by the softmax family.

One kernel family covers every op whose scores are

    u_ij = scale · α_i · β_j · (q_i · k_j),   visible iff j ≤ i,

with a row factor α (SSA's per-query `logit_scale`; softplus attention's
log D · log i / ‖q_i‖) and a column factor β (softplus attention's 1/‖k_j‖):

- `softmax`: online softmax, fp32 accumulators, the lse saved for the
  backward pass;
- `lssa`: softplus weights, one pass (softplus is bounded here, so no
  running max is needed), the row sum Z saved;
- `lssar`: LSSA sharpened with `power`; a first pass over the row gives Z and
  the row max, a second the re-weighted output.

Packed documents: `segment_ids` [batch, time] (both backends, forward and
backward) keep documents apart: a query sees only earlier keys of its own
document, and softplus attention's row index i becomes the position within
the document. The kernels read one integer per row, its document's start,
and skip every tile without a visible entry (see each backend's docstring).

Modules:
  _tile:       the element-wise tile math, pure jnp, shared by both backends so
               that their semantics cannot drift apart;
  _common:     argument preparation (α, β, padding, document starts and
               positions) shared by both backends;
  pallas_tpu:  Mosaic TPU kernels (`pl.pallas_call`, grid over tiles);
  pallas_gpu:  Pallas GPU kernels (Triton lowering; see its docstring).

The public entry points are `attnlab.ops.softmax_attention` and
`attnlab.ops.softplus_attention` with `implementation='pallas_tpu'` or
`'pallas_gpu'`.
"""
