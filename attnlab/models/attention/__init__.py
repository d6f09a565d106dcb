"""Attention mixers. Importing this package registers every variant."""

from attnlab.models.attention import gated_deltanet, linear, lucid, nats_l, softmax, softplus, ssa  # noqa: F401  (registration)
from attnlab.models.attention.registry import build, get, names

__all__ = ["build", "get", "names"]
