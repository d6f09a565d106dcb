"""Causal SOFT attention; the op is `api.soft_attention`.

The Nyström features, the normaliser floor and its default eps are exported
too: SOFT's analysis adapter rebuilds the layer as linear attention over
these features.
"""

from attnlab.ops.soft.api import NORMALIZER_EPS
from attnlab.ops.soft.xla import normalizer_floor, nystrom_features

__all__ = ["NORMALIZER_EPS", "normalizer_floor", "nystrom_features"]
