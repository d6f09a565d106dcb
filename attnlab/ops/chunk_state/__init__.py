"""Chunked state-passing kernels shared by the gated delta rule and linear attention.

Both ops carry a [head_dim, head_dim_v] state across chunks of the sequence;
the sequential pass over chunks is the Pallas kernel, forward and backward,
and everything that does not depend on the state is batched XLA.

Modules:
  _common:     the per-chunk tile math, the custom VJP and the XLA-side
               preparation (WY factors, padding), shared by both backends;
  pallas_tpu:  Mosaic TPU kernels (grid over chunks, state in VMEM);
  pallas_gpu:  Pallas GPU kernels (Triton lowering, state in registers).

The public entry points are `attnlab.ops.gated_delta_rule` and
`attnlab.ops.linear_attention` with `implementation='pallas_tpu'` or
`'pallas_gpu'`.
"""
