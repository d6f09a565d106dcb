"""Collect the multi-needle runs of run.sh into results.json, results.md and multi_needle.png.

python experiments/multi_needle/summarize.py runs/experiments/multi_needle [runs/experiments/multi_needle_T256_n16_q4 ...]

Each argument is one setting's run directory (<variant>_seed<s>/ workdirs); the setting
is read from the runs' config.json. Besides the final accuracy, each run's learning speed
is the first evaluated step at which it reached 0.9.
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
THRESHOLD = 0.9


def _setting(workdir: str) -> str:
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  data = config["data"]
  return (
    f"T={data['seq_len']}, {data['num_kv_pairs']} needles, {data['num_queries']} queried, "
    f"{config['total_steps']} steps"
  )


def _steps_to(curve: list, threshold: float) -> int | None:
  return next((step for step, acc in curve if acc >= threshold), None)


def collect(out: str) -> tuple[str, dict]:
  """(setting, variant -> seed -> eval curve) of one run directory."""
  runs, setting = {}, None
  for wd in sorted(glob.glob(os.path.join(out, "*_seed*"))):
    m = re.match(r"(.+)_seed(\d+)$", os.path.basename(wd))
    curve = _metrics.evals(wd, "eval/accuracy") if m else []
    if curve:
      runs.setdefault(m.group(1), {})[int(m.group(2))] = curve
      setting = _setting(wd)
  return setting, runs


def summarise(runs: dict) -> tuple[dict, list[str]]:
  summary = {}
  lines = [
    f"| variant | seeds | final accuracy per seed | mean ± std | steps to {THRESHOLD} per seed |",
    "|---|---|---|---|---|",
  ]
  for v, by_seed in sorted(runs.items()):
    finals = np.array([c[-1][1] for c in by_seed.values()])
    reach = {s: _steps_to(c, THRESHOLD) for s, c in by_seed.items()}
    summary[v] = {
      "final_accuracy": dict(zip(map(str, by_seed), finals.tolist())),
      "mean": float(finals.mean()),
      "std": float(finals.std()),
      "steps_to_threshold": {str(s): r for s, r in reach.items()},
      "curves": {str(s): c for s, c in by_seed.items()},
    }
    per_seed = ", ".join(f"{s}: {a:.3f}" for s, a in zip(by_seed, finals))
    steps = ", ".join(f"{s}: {r if r is not None else '-'}" for s, r in reach.items())
    lines.append(
      f"| {v} | {len(finals)} | {per_seed} | {finals.mean():.3f} ± {finals.std():.3f} | {steps} |"
    )
  return summary, lines


def _committed() -> dict:
  """setting -> variant -> seed -> curve, from the committed results.json (settings whose
  workdirs are gone keep their recorded curves)."""
  path = os.path.join(HERE, "results.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    stored = json.load(f)
  return {
    setting: {v: {int(s): c for s, c in r["curves"].items()} for v, r in variants.items()}
    for setting, variants in stored.items()
  }


def main(outs: list[str]) -> None:
  settings = _committed()
  for out in outs:
    setting, runs = collect(out)
    if runs:
      settings[setting] = runs
  results, lines = {}, []
  for setting, runs in settings.items():
    results[setting], table = summarise(runs)
    lines += [f"{setting}:", ""] + table + [""]
  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 3.6), squeeze=False)
  colours = {
    "softmax": "tab:blue",
    "lucid": "tab:red",
    "softmax_nope": "tab:cyan",
    "lucid_rope": "tab:orange",
  }
  for ax, (setting, runs) in zip(axes[0], settings.items()):
    for v, by_seed in sorted(runs.items()):
      for i, (_seed, curve) in enumerate(sorted(by_seed.items())):
        label = v if i == 0 else None
        ax.plot(*zip(*curve), marker=".", color=colours.get(v), alpha=0.8, label=label)
    ax.set(xlabel="step", ylabel="eval accuracy (queried values)", ylim=(-0.02, 1.02))
    ax.set_title(f"Multi-key needle, {setting}", fontsize=10)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "multi_needle.png"), dpi=110)


if __name__ == "__main__":
  main(sys.argv[1:])
