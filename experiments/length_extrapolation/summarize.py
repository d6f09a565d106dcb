"""Collect the evaluations of run.sh into results.json, results.md and extrapolation.png.

python experiments/length_extrapolation/summarize.py runs/experiments/shakespeare
"""

from __future__ import annotations

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = {
  "softmax": ("softmax", "eval_lengths.json"),
  "LSSA": ("softplus", "eval_lengths.json"),
  "LSSA, p=15 at eval": ("softplus", "eval_lengths_power=15*.json"),
}


def main(out: str) -> None:
  results = {}
  for name, (workdir, filename) in RUNS.items():
    (path,) = glob.glob(os.path.join(out, workdir, filename))
    with open(path) as f:
      results[name] = json.load(f)
  lengths = [r["seq_len"] for r in results["softmax"]["results"]]
  train_t = lengths[0]
  lines = [
    "| eval T | " + " | ".join(results) + " |",
    "|---" * (len(results) + 1) + "|",
  ]
  for i, t in enumerate(lengths):
    cells = [f"{r['results'][i]['loss']:.3f}" for r in results.values()]
    lines.append(f"| {t} ({t // train_t}x) | " + " | ".join(cells) + " |")
  rise = [f"{r['results'][-1]['loss'] - r['results'][0]['loss']:+.3f}" for r in results.values()]
  lines.append(f"| rise 1x -> {lengths[-1] // train_t}x | " + " | ".join(rise) + " |")
  with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print("\n".join(lines))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, ax_pos) = plt.subplots(1, 2, figsize=(10, 3.8))
  for name, r in results.items():
    ax.plot(lengths, [x["loss"] for x in r["results"]], marker="o", label=name)
    last = r["results"][-1]
    xs = [(i + 0.5) * last["bucket"] for i in range(len(last["loss_by_position"]))]
    ax_pos.plot(xs, last["loss_by_position"], marker=".", label=name)
  ax.set(
    xscale="log",
    xlabel="eval length T",
    ylabel="held-out loss (nats/byte)",
    title=f"Shakespeare bytes, trained at T={train_t}",
  )
  ax.set_xticks(lengths, [str(t) for t in lengths])
  ax.minorticks_off()
  ax_pos.axvline(train_t, color="k", ls="--", lw=0.7)
  ax_pos.set(
    xscale="log",
    xlabel="position",
    ylabel="loss by position bucket",
    title=f"at T={lengths[-1]} (dashed: trained length)",
  )
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "extrapolation.png"), dpi=110)


if __name__ == "__main__":
  main(sys.argv[1])
