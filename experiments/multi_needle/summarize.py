"""Collect the multi-needle runs of run.sh into results.json, results.md and multi_needle.png.

python experiments/multi_needle/summarize.py runs/experiments/multi_needle
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _metrics  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(out: str) -> None:
  runs = {}
  for wd in sorted(glob.glob(os.path.join(out, "*_seed*"))):
    m = re.match(r"(.+)_seed(\d+)$", os.path.basename(wd))
    curve = _metrics.evals(wd, "eval/accuracy") if m else []
    if curve:
      runs.setdefault(m.group(1), {})[int(m.group(2))] = curve
  summary = {}
  lines = ["| variant | seeds | final accuracy per seed | mean ± std |", "|---|---|---|---|"]
  for v, by_seed in runs.items():
    finals = np.array([c[-1][1] for c in by_seed.values()])
    summary[v] = {
      "final_accuracy": dict(zip(map(str, by_seed), finals.tolist())),
      "mean": float(finals.mean()),
      "std": float(finals.std()),
      "curves": {str(s): c for s, c in by_seed.items()},
    }
    per_seed = ", ".join(f"{s}: {a:.3f}" for s, a in zip(by_seed, finals))
    lines.append(f"| {v} | {len(finals)} | {per_seed} | {finals.mean():.3f} ± {finals.std():.3f} |")
  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.6))
  colours = {"softmax": "tab:blue", "lucid": "tab:red"}
  for v, by_seed in runs.items():
    for i, (_seed, curve) in enumerate(sorted(by_seed.items())):
      ax.plot(
        *zip(*curve), marker=".", color=colours.get(v), alpha=0.8, label=v if i == 0 else None
      )
  ax.set(
    xlabel="step",
    ylabel="eval accuracy (queried values)",
    ylim=(-0.02, 1.02),
    title="Multi-key needle, T=64, 6 needles, 2 queried",
  )
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "multi_needle.png"), dpi=110)


if __name__ == "__main__":
  main(sys.argv[1])
