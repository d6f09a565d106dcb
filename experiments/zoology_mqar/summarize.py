"""Collect the MQAR runs of run.sh into results_d<D>_v<V>.{json,md} and mqar_d<D>_v<V>.png.

python experiments/zoology_mqar/summarize.py runs/experiments/zoology_mqar 64 8192
python experiments/zoology_mqar/summarize.py - 64 64   # redraw from the committed JSON

Runs found in the workdirs are merged into the committed JSON (a run found replaces the
same variant and setting there), so settings run in different sessions add up.
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


def collect(out: str, d: str, vocab: str) -> dict:
  """variant -> 'T<t>_P<pairs>' -> final accuracy, steps and eval curve, from the workdirs."""
  results = {}
  for wd in sorted(glob.glob(os.path.join(out, f"*_d{d}_v{vocab}"))):
    m = re.match(r"(.+)_T(\d+)_P(\d+)_d\d+_v\d+$", os.path.basename(wd))
    if not m or not os.path.exists(os.path.join(wd, "metrics.jsonl")):
      continue
    variant, t, pairs = m.group(1), int(m.group(2)), int(m.group(3))
    curve = _metrics.evals(wd, "eval/accuracy")
    with open(os.path.join(wd, "config.json")) as f:
      lr = json.load(f)["optim"]["lr"]
    if curve:
      results.setdefault(variant, {})[f"T{t}_P{pairs}"] = {
        "T": t,
        "pairs": pairs,
        "lr": lr,
        "final_accuracy": curve[-1][1],
        "steps": curve[-1][0],
        "curve": curve,
      }
  return results


def ordered(names) -> list[str]:
  return [n for n in ORDER if n in names] + sorted(set(names) - set(ORDER))


def best_over_lr(results: dict) -> dict:
  """Zoology's protocol: model -> setting -> (its best run, the rates run). A run tagged
  `_lr<value>` is its model's run at that rate; other tags (such as `_nope`) are other
  models."""
  runs_by_model: dict = {}
  for name, runs in results.items():
    model = re.sub(r"_lr[^_]+$", "", name)
    for setting, r in runs.items():
      runs_by_model.setdefault(model, {}).setdefault(setting, []).append(r)
  return {
    model: {
      s: (max(runs, key=lambda r: r["final_accuracy"]), sorted({r["lr"] for r in runs}))
      for s, runs in by_setting.items()
    }
    for model, by_setting in runs_by_model.items()
  }


def table(rows: dict, settings: list[str], cell) -> list[str]:
  """Markdown: one row per name of `rows` (name -> setting -> entry), `cell(entry)` each."""
  lines = ["| model | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
  for name in ordered(rows):
    cells = [cell(rows[name][s]) if s in rows[name] else "-" for s in settings]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def main(out: str, d: str, vocab: str) -> None:
  path = os.path.join(HERE, f"results_d{d}_v{vocab}.json")
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  if out != "-":
    for variant, runs in collect(out, d, vocab).items():
      results.setdefault(variant, {}).update(runs)
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  settings = sorted(
    {k for r in results.values() for k in r}, key=lambda s: tuple(map(int, s[1:].split("_P")))
  )
  lines = table(
    results, settings, lambda r: f"{r['final_accuracy']:.3f} (lr {r['lr']:g}, step {r['steps']})"
  )
  best = best_over_lr(results)
  if any(len(e[1]) > 1 for by_setting in best.values() for e in by_setting.values()):
    lines += ["", "Best over the learning rates run (Zoology's protocol):", ""]
    lines += table(
      best,
      settings,
      lambda e: (
        f"{e[0]['final_accuracy']:.3f} (lr {e[0]['lr']:g} of "
        + ", ".join(f"{lr:g}" for lr in e[1])
        + ")"
      ),
    )
  with open(os.path.join(HERE, f"results_d{d}_v{vocab}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  settings_by_pairs = sorted({(r["pairs"], r["T"]) for v in results.values() for r in v.values()})
  pairs = [p for p, _ in settings_by_pairs]
  fig, (ax, ax_curve) = plt.subplots(1, 2, figsize=(11, 3.8))
  styles = ["-", "--", ":", "-."]
  for i, model in enumerate(ordered(best)):
    color = f"C{i}"
    runs = sorted((e[0] for e in best[model].values()), key=lambda r: r["pairs"])
    ax.plot([r["pairs"] for r in runs], [r["final_accuracy"] for r in runs], marker="o",
            color=color, label=model)  # fmt: skip
    for r in runs:
      style = styles[pairs.index(r["pairs"]) % len(styles)]
      ax_curve.plot(*zip(*r["curve"]), marker=".", color=color, ls=style, lw=1)
  ax.set(
    xscale="log",
    xlabel="key-value pairs (" + ", ".join(f"{p} at T={t}" for p, t in settings_by_pairs) + ")",
    ylabel="final eval accuracy (best lr)",
    title=f"MQAR, vocab {vocab}, d_model {d}, 2 layers",
    ylim=(-0.02, 1.02),
  )
  ax.set_xticks(pairs, [str(p) for p in pairs])
  ax.minorticks_off()
  ax.legend(fontsize=8)
  ax_curve.set(xlabel="step", ylabel="eval accuracy", ylim=(-0.02, 1.02))
  ax_curve.set_title(
    "best-lr run per model (colour: model; line: "
    + ", ".join(f"{styles[i % len(styles)]!s} {p} pairs" for i, p in enumerate(pairs))
    + ")",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, f"mqar_d{d}_v{vocab}.png"), dpi=110)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3])
