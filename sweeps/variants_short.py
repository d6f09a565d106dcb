"""Softmax against Gated DeltaNet on MQAR, learning rate paired with each (a zip):
a two-run sweep small enough for a CPU in a few minutes.

    python -m attnlab.sweep --config=configs/tiny.py:steps=200 --sweep=sweeps/variants_short.py \
        --workdir=runs/variants_short
"""

from attnlab.sweep import axis, zip_


def get_sweep():
  return zip_(
    axis(":attention", ["softmax", "gated_deltanet"]), axis("config.optim.lr", [3e-3, 3e-3])
  )
