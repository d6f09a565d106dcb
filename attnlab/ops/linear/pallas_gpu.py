"""Causal linear attention on the GPU chunked state-pass kernels (`attnlab.ops.chunk_state`)."""

from attnlab.ops.chunk_state.pallas_gpu import linear_attention

__all__ = ["linear_attention"]
