"""The gated delta rule on the GPU chunked state-pass kernels (`attnlab.ops.chunk_state`)."""

from attnlab.ops.chunk_state.pallas_gpu import gated_delta_rule

__all__ = ["gated_delta_rule"]
