"""attnlab: attention variants in one JAX/Flax NNX transformer trunk."""

__version__ = "0.1.0"
