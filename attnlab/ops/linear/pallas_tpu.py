"""Causal linear attention on the TPU chunked state-pass kernels (`attnlab.ops.chunk_state`)."""

from attnlab.ops.chunk_state.pallas_tpu import linear_attention

__all__ = ["linear_attention"]
