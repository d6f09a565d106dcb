"""Collect the evaluations of run.sh into results.json, results.md and extrapolation.png.

python experiments/length_extrapolation/summarize.py runs/experiments/shakespeare [runs/experiments/shakespeare_1000]
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
  "LSSAR p=15, trained": ("softplus_p15", "eval_lengths.json"),
}


def _evaluations(out: str) -> dict:
  """The evaluations found under one run directory, by column name."""
  results = {}
  for name, (workdir, filename) in RUNS.items():
    paths = glob.glob(os.path.join(out, workdir, filename))
    if paths:
      with open(paths[0]) as f:
        results[name] = json.load(f)
  return results


def _table(results: dict) -> list[str]:
  lengths = [r["seq_len"] for r in next(iter(results.values()))["results"]]
  train_t = lengths[0]
  lines = ["| eval T | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
  for i, t in enumerate(lengths):
    cells = [f"{r['results'][i]['loss']:.3f}" for r in results.values()]
    lines.append(f"| {t} ({t // train_t}x) | " + " | ".join(cells) + " |")
  rise = [f"{r['results'][-1]['loss'] - r['results'][0]['loss']:+.3f}" for r in results.values()]
  lines.append(f"| rise 1x -> {lengths[-1] // train_t}x | " + " | ".join(rise) + " |")
  return lines


def main(outs: list[str]) -> None:
  """`outs`: run directories (one per training length in steps), each with its workdirs."""
  by_steps = {}
  for out in outs:
    results = _evaluations(out)
    if results:
      by_steps[next(iter(results.values()))["step"]] = results
  lines = []
  for steps, results in sorted(by_steps.items()):
    lines += [f"Trained {steps} steps, held-out loss (nats/byte):", ""] + _table(results) + [""]
  with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump({str(k): v for k, v in sorted(by_steps.items())}, f, indent=1)
  print("\n".join(lines))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(by_steps), 2, figsize=(10, 3.8 * len(by_steps)), squeeze=False)
  for (steps, results), (ax, ax_pos) in zip(sorted(by_steps.items()), axes):
    lengths = [x["seq_len"] for x in next(iter(results.values()))["results"]]
    train_t = lengths[0]
    for name, r in results.items():
      ax.plot(lengths, [x["loss"] for x in r["results"]], marker="o", label=name)
      last = r["results"][-1]
      xs = [(i + 0.5) * last["bucket"] for i in range(len(last["loss_by_position"]))]
      ax_pos.plot(xs, last["loss_by_position"], marker=".", label=name)
    ax.set(
      xscale="log",
      xlabel="eval length T",
      ylabel="held-out loss (nats/byte)",
      title=f"Shakespeare bytes, trained at T={train_t} for {steps} steps",
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
  main(sys.argv[1:])
