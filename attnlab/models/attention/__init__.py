"""Attention mixers. Importing this package registers every variant."""

# Importing a variant's module registers it.
from attnlab.models.attention import (
  gated_deltanet,  # noqa: F401
  linear,  # noqa: F401
  lucid,  # noqa: F401
  nats_l,  # noqa: F401
  soft,  # noqa: F401
  softmax,  # noqa: F401
  softplus,  # noqa: F401
  ssa,  # noqa: F401
)
from attnlab.models.attention.base import Documents
from attnlab.models.attention.registry import build, get, names

__all__ = ["Documents", "build", "get", "names"]
