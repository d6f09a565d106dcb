"""Collect the runs of run.sh into results.json, results.md and nats_l.png.

python experiments/nats_l_shakespeare/summarize.py runs/experiments/shakespeare [more seed dirs]
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _metrics  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["softmax", "gated_deltanet", "nats_l"]


def _run(workdir: str) -> dict | None:
  """One finished run's curves, or None if it has not reached its first evaluation."""
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return None
  rows = _metrics.read(workdir)
  evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
  if not evals:
    return None
  fractions = {
    k: [(r["step"], r[k]) for r in rows if k in r]
    for k in sorted({k for r in rows for k in r if k.endswith("attn_block_fraction")})
  }
  acc = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
  return {
    "seed": json.load(open(os.path.join(workdir, "config.json"))).get("seed"),
    "eval_loss": evals,
    "final_eval_loss": evals[-1][1],
    "final_eval_accuracy": acc[-1] if acc else None,
    "train_loss": [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r],
    "attn_fraction": fractions,
  }


def main(outs: list[str]) -> None:
  """`outs`: one run directory per seed, each holding <variant>/ workdirs."""
  results = {v: [r for out in outs if (r := _run(os.path.join(out, v)))] for v in VARIANTS}
  results = {v: runs for v, runs in results.items() if runs}
  lines = [
    "| variant | seeds | final eval loss per seed (nats/byte) | mean | attention-block fraction"
    " per layer, last logged, per seed |",
    "|---|---|---|---|---|",
  ]
  for v, runs in results.items():
    losses = [r["final_eval_loss"] for r in runs]
    per_seed = ", ".join(f"{r['seed']}: {r['final_eval_loss']:.3f}" for r in runs)
    frac = "; ".join(
      ", ".join(f"{c[-1][1]:.3f}" for c in r["attn_fraction"].values()) for r in runs
    )
    mean = sum(losses) / len(losses)
    lines.append(f"| {v} | {len(runs)} | {per_seed} | {mean:.3f} | {frac or '-'} |")
  with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print("\n".join(lines))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, ax_frac) = plt.subplots(1, 2, figsize=(10, 3.8))
  for v, runs in results.items():
    color = None
    for i, r in enumerate(runs):
      label = f"{v} (train)" if i == 0 else None
      (line,) = ax.plot(
        *zip(*r["train_loss"]), marker=".", label=label, color=color, alpha=1 - 0.4 * i
      )
      color = line.get_color()
      ax.plot(*zip(*r["eval_loss"]), marker="*", ms=12, ls="", color=color)
  if "nats_l" in results:
    for r in results["nats_l"]:
      for k, c in r["attn_fraction"].items():
        ax_frac.plot(*zip(*c), marker=".", label=f"{k.split('/')[1]}, seed {r['seed']}")
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
  main(sys.argv[1:])
