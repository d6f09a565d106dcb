"""Collect the runs of run.sh into results.json, results.md and nats_l.png.

python experiments/nats_l_shakespeare/summarize.py runs/experiments/shakespeare
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _metrics  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["softmax", "gated_deltanet", "nats_l"]


def main(out: str) -> None:
  results = {}
  for v in VARIANTS:
    if not os.path.exists(os.path.join(out, v, "metrics.jsonl")):
      continue  # not run (yet)
    rows = _metrics.read(os.path.join(out, v))
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    if not evals:
      continue  # stopped before its first evaluation
    fractions = {
      k: [(r["step"], r[k]) for r in rows if k in r]
      for k in sorted({k for r in rows for k in r if k.endswith("attn_block_fraction")})
    }
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    results[v] = {
      "eval_loss": evals,
      "final_eval_loss": evals[-1][1],
      "train_loss": train,
      "attn_fraction": fractions,
    }
    train = [r.get("train/seconds") for r in rows if "train/seconds" in r]
    if train:
      results[v]["train_seconds"] = train[-1]
  lines = [
    "| variant | final eval loss (nats/byte) | attention-block fraction (last logged) |",
    "|---|---|---|",
  ]
  for v, r in results.items():
    frac = ", ".join(f"{k.split('/')[1]}: {c[-1][1]:.3f}" for k, c in r["attn_fraction"].items())
    lines.append(f"| {v} | {r['final_eval_loss']:.3f} | {frac or '-'} |")
  with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print("\n".join(lines))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, ax_frac) = plt.subplots(1, 2, figsize=(10, 3.8))
  for v, r in results.items():
    (line,) = ax.plot(*zip(*r["train_loss"]), marker=".", label=f"{v} (train)")
    ax.plot(*zip(*r["eval_loss"]), marker="*", ms=12, ls="", color=line.get_color())
  for k, c in results["nats_l"]["attn_fraction"].items():
    ax_frac.plot(*zip(*c), marker=".", label=k.split("/")[1])
  ax.set(
    xlabel="step", ylabel="loss (nats/byte; stars: held-out)", title="Shakespeare bytes, T=128"
  )
  ax.legend(fontsize=8)
  ax_frac.set(
    xlabel="step",
    ylabel="fraction of blocks routed to softmax",
    title="NAtS-L routing (train batches)",
    ylim=(-0.02, 1.02),
  )
  ax_frac.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "nats_l.png"), dpi=110)


if __name__ == "__main__":
  main(sys.argv[1])
