"""Collect the MQAR runs of run.sh into results.json, results.md and mqar.png.

python experiments/zoology_mqar/summarize.py runs/experiments/zoology_mqar 64 512
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _metrics  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["softmax", "lucid", "gated_deltanet", "nats_l", "linear"]


def main(out: str, d: str, vocab: str) -> None:
  results = {}
  for wd in sorted(glob.glob(os.path.join(out, f"*_d{d}_v{vocab}"))):
    m = re.match(r"(.+)_T(\d+)_P(\d+)_d\d+_v\d+$", os.path.basename(wd))
    if not m or not os.path.exists(os.path.join(wd, "metrics.jsonl")):
      continue
    variant, t, pairs = m.group(1), int(m.group(2)), int(m.group(3))
    curve = _metrics.evals(wd, "eval/accuracy")
    if curve:
      results.setdefault(variant, {})[f"T{t}_P{pairs}"] = {
        "T": t,
        "pairs": pairs,
        "final_accuracy": curve[-1][1],
        "steps": curve[-1][0],
        "curve": curve,
      }
  with open(os.path.join(HERE, f"results_d{d}_v{vocab}.json"), "w") as f:
    json.dump(results, f, indent=1)
  settings = sorted(
    {k for r in results.values() for k in r}, key=lambda s: int(s[1:].split("_")[0])
  )
  lines = ["| variant | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
  for v in [v for v in ORDER if v in results]:
    cells = [
      f"{results[v][s]['final_accuracy']:.3f} (step {results[v][s]['steps']})"
      if s in results[v]
      else "-"
      for s in settings
    ]
    lines.append(f"| {v} | " + " | ".join(cells) + " |")
  with open(os.path.join(HERE, f"results_d{d}_v{vocab}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, ax_curve) = plt.subplots(1, 2, figsize=(10, 3.6))
  for v in [v for v in ORDER if v in results]:
    pts = sorted((r["pairs"], r["final_accuracy"]) for r in results[v].values())
    ax.plot(*zip(*pts), marker="o", label=v)
    for r in results[v].values():
      ax_curve.plot(*zip(*r["curve"]), marker=".", label=f"{v}, {r['pairs']} pairs")
  ts = sorted({r["T"] for v in results.values() for r in v.values()})
  ax.set(
    xscale="log",
    xlabel=f"key-value pairs (T = {ts})",
    ylabel="final eval accuracy",
    title=f"MQAR, vocab {vocab}, d_model {d}, 2 layers",
    ylim=(-0.02, 1.02),
  )
  ax.set_xticks([4, 8, 16], ["4", "8", "16"])
  ax_curve.set(xlabel="step", ylabel="eval accuracy", ylim=(-0.02, 1.02), title="per run")
  ax_curve.legend(fontsize=7)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, f"mqar_d{d}_v{vocab}.png"), dpi=110)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3])
