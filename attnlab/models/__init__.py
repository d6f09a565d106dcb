"""Models: the transformer trunk and the attention mixers it plugs in."""

from attnlab.models.transformer import Transformer, build_model, layer_mixers

__all__ = ["Transformer", "build_model", "layer_mixers"]
