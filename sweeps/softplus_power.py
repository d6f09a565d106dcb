"""LSSA (power 0) and LSSAR (power 3, 15) on tiny recall, 600 steps: the runs behind
benchmarks/results/softplus_power_recall_2026-11-28.md.

    python -m attnlab.sweep --config=configs/tiny.py:attention=softplus \
        --sweep=sweeps/softplus_power.py --workdir=runs/softplus_power
"""

from attnlab.sweep import axis, product


def get_sweep():
  return product(
    axis(":task", ["mqar", "needle"]), axis("config.model.mixer.softplus.power", [0.0, 3.0, 15.0])
  )
