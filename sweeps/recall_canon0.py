"""Tiny recall without the Canon conv (configs/tiny.py:canon=0), every variant,
600 steps: the README's canon=0 ablation (`python -m benchmarks.recall --canon=0`).

    python -m attnlab.sweep --config=configs/tiny.py:canon=0 --sweep=sweeps/recall_canon0.py \
        --workdir=runs/recall_canon0
"""

from attnlab.sweep import axis, product

VARIANTS = ["softmax", "linear", "gated_deltanet", "nats_l", "lucid", "ssa", "softplus", "soft"]


def get_sweep():
  return product(axis(":task", ["mqar", "needle"]), axis(":attention", VARIANTS))
