"""Tiny recall, every variant on MQAR and needle at 600 steps (configs/tiny.py, canon=4):
the sweep behind the README's recall table (benchmarks/recall.py's defaults).

    python -m attnlab.sweep --config=configs/tiny.py --sweep=sweeps/recall.py --workdir=runs/recall
    python -m attnlab.compare runs/recall
"""

from attnlab.sweep import axis, product

VARIANTS = ["softmax", "linear", "gated_deltanet", "nats_l", "lucid", "ssa", "softplus", "soft"]


def get_sweep():
  return product(axis(":task", ["mqar", "needle"]), axis(":attention", VARIANTS))
